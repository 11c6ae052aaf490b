"""The base layer: errors, atomic file I/O, config loading, ONNX export. Imports no other updp layer."""
