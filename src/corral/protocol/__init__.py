"""What crosses a boundary: msgspec Structs and their codecs only, no behaviour."""
