"""Model compression: calibration data for the quantizers (`model/quant.py`), GGUF and ONNX export."""
