"""The tqdm bar of saves and loads: shown on a terminal, off by argument, environment or a pipe.

Each case runs a save and a load in a subprocess whose stderr is a pseudo-terminal (``pty``), with
the bar's delay set to 0 so that a small checkpoint shows it.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from megatron_core import dist_checkpointing as dc
    from megatron_core.dist_checkpointing import progress
    progress.DELAY_S = 0.0  # show at once (the default 2 s keeps quick saves silent)
    update = progress.Progress.update
    def slowly(self, nbytes):  # a slow disk: tqdm redraws at most every 0.1 s
        time.sleep(0.15)
        update(self, nbytes)
    progress.Progress.update = slowly
    arg = {"default": None, "off": False}[sys.argv[2]]
    state = {"w": dc.ShardedTensor.from_rank_offsets("w", torch.arange(1 << 18, dtype=torch.float32))}
    dc.save(state, sys.argv[1] + "/ckpt", progress=arg)
    out = dc.load({"w": dc.ShardedTensor.from_rank_offsets("w", torch.empty(1 << 18))}, sys.argv[1] + "/ckpt",
                  progress=arg)
    assert torch.equal(out["w"], torch.arange(1 << 18, dtype=torch.float32))
    print("ok", flush=True)
""")


def _run(tmp_path, arg: str, env_value: str | None, tty: bool) -> tuple[str, str]:
    """(stdout, what the child wrote to its stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "MCORE_CKPT_PROGRESS"}
    if env_value is not None:
        env["MCORE_CKPT_PROGRESS"] = env_value
    cmd = [sys.executable, "-c", SCRIPT, str(tmp_path), arg]
    if not tty:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout, proc.stderr
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a terminal has a size
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    chunks = []
    while True:  # read while it runs: a full pty buffer would block the child
        ready, _, _ = select.select([master], [], [], 120)
        if not ready:
            proc.kill()
            raise AssertionError("the child wrote nothing for 120 s")
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    stdout = proc.stdout.read() if proc.stdout else ""
    assert proc.wait(60) == 0, b"".join(chunks).decode(errors="replace")
    return stdout, b"".join(chunks).decode(errors="replace")


def test_a_terminal_shows_the_bar_of_save_and_load(tmp_path):
    stdout, stderr = _run(tmp_path, "default", None, tty=True)
    assert stdout.strip() == "ok"
    assert "save ckpt:" in stderr and "load ckpt:" in stderr
    assert "100%|" in stderr and "1.00M/1.00M" in stderr  # bytes, with binary units (1 MiB written and read)
    assert "B/s" in stderr  # the rate


@pytest.mark.parametrize(("arg", "env_value", "tty"), [("off", None, True), ("default", "0", True),
                                                       ("default", None, False)],
                         ids=["progress=False", "MCORE_CKPT_PROGRESS=0", "not a terminal"])
def test_the_bar_is_off_by_argument_environment_or_without_a_terminal(tmp_path, arg, env_value, tty):
    stdout, stderr = _run(tmp_path, arg, env_value, tty)
    assert stdout.strip() == "ok"
    assert "ckpt:" not in stderr and "%|" not in stderr, stderr
