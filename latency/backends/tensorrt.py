"""TensorRT: build an engine from ONNX with the Python API, time it with pycuda events.

TensorRT 10 and 11 both work. 10 takes precision from builder flags (FP16,
INT8 with a calibrator). 11 is always strongly typed and has no precision
flags or calibrators: precision lives in the ONNX graph itself, so fp16 is
exported as a float16 graph and int8 needs explicit Q/DQ nodes (ModelOpt).
A timing cache file is reused across builds. Buffers stay on the device and
each run is timed with CUDA events on one stream (trtexec's GPU Compute Time).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from updp.core.errors import UpdpError
from updp.core.fileio import atomic_path
from updp.latency.base import LatencyBackend, MeasureConfig

INSTALL_HINT = 'pip install "updp[trt]" (TensorRT 10 or 11 and pycuda; needs an NVIDIA GPU and its CUDA driver)'


def _trt_major() -> int:
    import tensorrt as trt

    return int(trt.__version__.split(".")[0])


def _make_logger():
    import tensorrt as trt

    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors.append(str(msg))

    return Logger()


class TensorRTBackend(LatencyBackend):
    name = "tensorrt"
    supported_precisions = ("fp32", "fp16", "int8")

    def __init__(self, timing_cache: str | Path | None = None, calibrator: Any = None,
                 workspace_gib: float | None = None, device_id: int = 0):
        self.timing_cache = Path(timing_cache) if timing_cache else None
        self.calibrator = calibrator
        self.workspace_gib = workspace_gib
        self.device_id = device_id
        self.cuda_ctx = None
        self.buffers: list = []

    @classmethod
    def unavailable_reason(cls) -> str | None:
        missing = []
        for module in ("tensorrt", "pycuda"):
            try:
                __import__(module)
            except ImportError:
                missing.append(module)
        if missing:
            return f"{' and '.join(missing)} not installed: {INSTALL_HINT}"
        try:
            import pycuda.driver as cuda

            cuda.init()
            if cuda.Device.count() == 0:
                return "no CUDA GPU found"
        except Exception as e:  # noqa: BLE001 - driver errors vary by platform
            return f"CUDA driver not usable ({type(e).__name__}: {e})"
        return None

    def wants_half_onnx(self) -> bool:
        return _trt_major() >= 11

    # --- build -------------------------------------------------------------------------------------

    def _network(self, builder, logger, onnx_path: str):
        import tensorrt as trt

        flags = 0
        if _trt_major() >= 11 and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # implied on 11, stated anyway
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise UpdpError(f"TensorRT could not parse the ONNX model: {errors[:400]}")
        return network, parser

    def _set_precision(self, config, network, precision: str) -> None:
        import tensorrt as trt

        if precision == "fp32":
            return
        if _trt_major() < 11:
            if precision == "int8":
                if self.calibrator is None:
                    raise UpdpError("int8 on TensorRT 10 needs a calibrator: TensorRTBackend(calibrator=...)")
                config.set_flag(trt.BuilderFlag.INT8)
                config.int8_calibrator = self.calibrator
            config.set_flag(trt.BuilderFlag.FP16)
            return
        if precision == "fp16" and network.get_input(0).dtype != trt.float16:
            raise UpdpError("TensorRT 11 is strongly typed: give it a float16 ONNX (pass the nn.Module so updp "
                            "exports it in half precision, or convert with ModelOpt AutoCast)")
        if precision == "int8" and not _has_qdq(network):
            raise UpdpError("TensorRT 11 removed int8 calibration: the ONNX needs explicit Q/DQ nodes "
                            "(quantize it with ModelOpt first)")

    def _load_timing_cache(self, config):
        data = self.timing_cache.read_bytes() if self.timing_cache and self.timing_cache.is_file() else b""
        try:
            cache = config.create_timing_cache(data)
        except Exception:  # noqa: BLE001 - a damaged cache file is rebuilt, not fatal
            cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=True)

    def _save_timing_cache(self, config) -> None:
        if self.timing_cache is None:
            return
        with atomic_path(self.timing_cache) as tmp:
            tmp.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))

    def _build(self, onnx_path: str, cfg: MeasureConfig) -> bytes:
        import tensorrt as trt

        logger = _make_logger()
        builder = trt.Builder(logger)
        network, _parser = self._network(builder, logger, onnx_path)
        config = builder.create_builder_config()
        if self.workspace_gib:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.workspace_gib * (1 << 30)))
        self._set_precision(config, network, cfg.precision)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            profile.set_shape(tensor.name, cfg.full_shape, cfg.full_shape, cfg.full_shape)
        config.add_optimization_profile(profile)
        self._load_timing_cache(config)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise UpdpError(f"TensorRT engine build failed: {'; '.join(logger.errors)[:400] or 'no reason given'}")
        self._save_timing_cache(config)
        self.logger = logger
        return plan

    # --- run ---------------------------------------------------------------------------------------

    def load(self, target: Any, cfg: MeasureConfig) -> None:
        import numpy as np
        import pycuda.driver as cuda
        import tensorrt as trt

        cuda.init()
        self.cuda_ctx = cuda.Device(self.device_id).make_context()
        plan = self._build(str(target), cfg)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(plan)
        self.context_ = self.engine.create_execution_context()
        rng = np.random.default_rng(0)
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            if is_input:
                self.context_.set_input_shape(name, cfg.full_shape)
            shape = tuple(self.context_.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            mem = cuda.mem_alloc(max(1, int(np.prod(shape)) * dtype.itemsize))
            if is_input:  # setup copy, outside the timed region
                cuda.memcpy_htod(mem, rng.standard_normal(shape).astype(dtype))
            self.context_.set_tensor_address(name, int(mem))
            self.buffers.append(mem)
        self.stream = cuda.Stream()
        self.events = (cuda.Event(), cuda.Event())

    def run_once(self) -> float | None:
        start, end = self.events
        start.record(self.stream)
        if not self.context_.execute_async_v3(self.stream.handle):
            raise UpdpError("TensorRT execute_async_v3 failed")
        end.record(self.stream)
        end.synchronize()
        return start.time_till(end)

    def release(self) -> None:
        for mem in self.buffers:
            mem.free()
        self.buffers = []
        self.context_ = self.engine = None
        if self.cuda_ctx is not None:
            self.cuda_ctx.pop()
            self.cuda_ctx.detach()
            self.cuda_ctx = None

    def context(self) -> dict[str, Any]:
        import pycuda
        import pycuda.driver as cuda
        import tensorrt as trt

        dev = cuda.Device(self.device_id)
        major, minor = dev.compute_capability()
        driver = cuda.get_driver_version()
        return {"device": dev.name(), "compute_capability": f"{major}.{minor}", "tensorrt": trt.__version__,
                "cuda_driver": f"{driver // 1000}.{(driver % 1000) // 10}", "pycuda": pycuda.VERSION_TEXT,
                "timing_cache": str(self.timing_cache) if self.timing_cache else None}


def _has_qdq(network) -> bool:
    import tensorrt as trt

    return any(network.get_layer(i).type == trt.LayerType.QUANTIZE for i in range(network.num_layers))
