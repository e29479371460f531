"""CPU stand-in of ``transformer_engine.common`` (only ``recipe``)."""
