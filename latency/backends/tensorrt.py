"""TensorRT: build an engine from ONNX with the Python API, time it with pycuda events.

TensorRT 10 and 11 both work. 10 takes precision from builder flags (FP16,
INT8 with a calibrator) unless ``strongly_typed=True``. 11 is always strongly
typed and has no precision flags or calibrators: precision lives in the ONNX
graph itself, so fp16 is exported as a float16 graph and int8 needs explicit
Q/DQ nodes (ModelOpt). Every engine is built with
``ProfilingVerbosity.DETAILED`` and its engine inspector's description is
checked against the requested precision (``updp.latency.trt_inspect``): an
engine that runs in another precision is a failure record, never a figure.
A timing cache file is reused across builds. Buffers stay on the device and
each run is timed with CUDA events on one stream (trtexec's GPU Compute Time).

CUDA context: every instance in the process shares the device's *primary*
context (the one the CUDA runtime, and so TensorRT and torch, use too),
held by ``ContextHolder``: the first instance to load retains it, the last
to release lets it go, and each instance pushes it only around its own
work (load, each run, release). Several instances stay loaded at once when
they are timed in turn (``updp.latency.interleave``), all in that one
context. The holder's bookkeeping is plain Python, tested on any
machine with a stand-in factory; the pycuda calls it makes (``cuda.init``,
``Device.retain_primary_context``, ``push``, ``Context.pop``, ``detach``)
run only on a machine with an NVIDIA GPU, pycuda and TensorRT.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from updp.core.errors import UpdpError
from updp.core.fileio import atomic_path
from updp.latency.base import LatencyBackend, MeasureConfig

INSTALL_HINT = 'pip install "updp[trt]" (TensorRT 10 or 11 and pycuda; needs an NVIDIA GPU and its CUDA driver)'
OPTIMIZATION_LEVELS = range(0, 6)  # TensorRT's builder optimization levels; 3 is its default


class ContextHolder:
    """One CUDA context per device for the whole process, counted by its holders.

    Args:
        factory: ``factory(device_id)`` makes the context; called on a device's first ``acquire`` only.
            What it returns needs ``push()``, ``pop()`` and ``detach()`` (a pycuda ``Context`` has them).
    """

    def __init__(self, factory: Callable[[int], Any]):
        self.factory = factory
        self.held: dict[int, list] = {}  # device id -> [context, holders]
        self.lock = threading.Lock()

    def acquire(self, device_id: int) -> Any:
        """Count one more holder of ``device_id``'s context, making it on the first; returns the context."""
        with self.lock:
            if device_id not in self.held:
                self.held[device_id] = [self.factory(device_id), 0]
            self.held[device_id][1] += 1
            return self.held[device_id][0]

    def release(self, device_id: int) -> None:
        """Count one holder less; the last one detaches the context (call it with the context popped)."""
        with self.lock:
            if device_id not in self.held:
                raise RuntimeError(f"CUDA context of device {device_id} released more often than acquired")
            entry = self.held[device_id]
            entry[1] -= 1
            if entry[1] == 0:
                del self.held[device_id]
                entry[0].detach()

    def holders(self, device_id: int) -> int:
        """How many holders ``device_id``'s context has now (0 when there is none)."""
        with self.lock:
            return self.held[device_id][1] if device_id in self.held else 0

    @contextlib.contextmanager
    def active(self, device_id: int) -> Iterator[Any]:
        """The held context of ``device_id``, current on this thread for the ``with`` block."""
        with self.lock:
            ctx = self.held[device_id][0]
        ctx.push()
        try:
            yield ctx
        finally:
            ctx.pop()


def _primary_context(device_id: int):
    """The device's primary context, retained (not pushed); pycuda's ``detach()`` releases it.

    ``detach()`` of a context that is not current pushes it before releasing, and a primary context's
    release does not pop: it stays current on the thread, as the CUDA runtime would make it anyway.
    """
    import pycuda.driver as cuda

    cuda.init()
    return cuda.Device(device_id).retain_primary_context()


CONTEXTS = ContextHolder(_primary_context)


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
    """TensorRT engines timed with CUDA events.

    Args:
        timing_cache: a file of TensorRT's timing cache, read before and written after each build.
        calibrator: an int8 calibrator, for int8 on TensorRT 10 without ``strongly_typed``.
        workspace_gib: the builder's workspace limit (TensorRT's default when None).
        device_id: the CUDA device.
        optimization_level: the builder optimization level, 0 to 5 (TensorRT's default 3 when None).
        strongly_typed: TensorRT 10 only: build a strongly typed network, whose precision is the ONNX graph's
            own (fp16 then gets a float16 graph, int8 needs Q/DQ nodes). TensorRT 11 always is.
    """

    name = "tensorrt"
    supported_precisions = ("fp32", "fp16", "int8")

    def __init__(self, timing_cache: str | Path | None = None, calibrator: Any = None,
                 workspace_gib: float | None = None, device_id: int = 0, optimization_level: int | None = None,
                 strongly_typed: bool = False):
        if optimization_level is not None and (type(optimization_level) is not int
                                               or optimization_level not in OPTIMIZATION_LEVELS):
            raise UpdpError(f"TensorRT builder optimization level must be an integer from 0 to 5 "
                            f"(3 is TensorRT's default); got {optimization_level!r}")
        self.timing_cache = Path(timing_cache) if timing_cache else None
        self.calibrator = calibrator
        self.workspace_gib = workspace_gib
        self.device_id = device_id
        self.optimization_level = optimization_level
        self.strongly_typed = bool(strongly_typed)
        self.holds_context = False
        self.build_facts: dict[str, Any] = {}
        self.buffers: list = []
        self.runtime = self.engine = self.context_ = self.stream = self.events = None

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
        return self._typed_by_graph()

    def _typed_by_graph(self) -> bool:
        """Whether the network's precision is the ONNX graph's (strongly typed) rather than the builder flags'."""
        return self.strongly_typed or _trt_major() >= 11

    # --- build -------------------------------------------------------------------------------------

    def _network(self, builder, logger, onnx_path: str):
        import tensorrt as trt

        flags = 0  # explicit batch is the only mode since 10; 11 is strongly typed without a flag
        if self.strongly_typed and _trt_major() < 11:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
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
        if not self._typed_by_graph():
            if precision == "int8":
                if self.calibrator is None:
                    raise UpdpError("int8 on TensorRT 10 needs a calibrator: TensorRTBackend(calibrator=...)")
                config.set_flag(trt.BuilderFlag.INT8)
                config.int8_calibrator = self.calibrator
            config.set_flag(trt.BuilderFlag.FP16)
            return
        if precision == "fp16" and network.get_input(0).dtype != trt.float16:
            raise UpdpError("strongly typed TensorRT takes fp16 from the graph: give it a float16 ONNX (pass the "
                            "nn.Module so updp exports it in half precision, or convert with ModelOpt AutoCast)")
        if precision == "int8" and not _has_qdq(network):
            raise UpdpError("strongly typed TensorRT has no int8 calibration: the ONNX needs explicit Q/DQ nodes "
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

    def _config(self, builder, network, cfg: MeasureConfig):
        import tensorrt as trt

        config = builder.create_builder_config()
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the inspector then lists layer types
        if self.optimization_level is not None:
            config.builder_optimization_level = self.optimization_level
        if self.workspace_gib:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(self.workspace_gib * (1 << 30)))
        self._set_precision(config, network, cfg.precision)
        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            profile.set_shape(tensor.name, cfg.full_shape, cfg.full_shape, cfg.full_shape)
        config.add_optimization_profile(profile)
        self._load_timing_cache(config)
        return config

    def _build(self, onnx_path: str, cfg: MeasureConfig) -> bytes:
        import tensorrt as trt

        logger = _make_logger()
        builder = trt.Builder(logger)
        network, _parser = self._network(builder, logger, onnx_path)
        config = self._config(builder, network, cfg)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise UpdpError(f"TensorRT engine build failed: {'; '.join(logger.errors)[:400] or 'no reason given'}")
        self._save_timing_cache(config)
        self.logger = logger
        return plan

    def _verify(self, precision: str) -> None:
        """Check the built engine's layers against ``precision`` (raises ``UpdpError`` on a mismatch)."""
        import tensorrt as trt

        from updp.latency.trt_inspect import check_precision

        inspector = self.engine.create_engine_inspector()
        inspector.execution_context = self.context_  # input shapes set: formats are shown, not "N/A"
        info = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
        self.build_facts = check_precision(info, precision)

    # --- run ---------------------------------------------------------------------------------------

    def load(self, target: Any, cfg: MeasureConfig) -> None:
        self.build_facts = {}
        if not self.holds_context:
            CONTEXTS.acquire(self.device_id)
            self.holds_context = True
        with CONTEXTS.active(self.device_id):
            self._load(str(target), cfg)

    def _load(self, onnx_path: str, cfg: MeasureConfig) -> None:
        import numpy as np
        import pycuda.driver as cuda
        import tensorrt as trt

        plan = self._build(onnx_path, cfg)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise UpdpError(f"TensorRT could not load the engine it built: {'; '.join(self.logger.errors)[:400]}")
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
        self._verify(cfg.precision)
        self.stream = cuda.Stream()
        self.events = (cuda.Event(), cuda.Event())

    def run_once(self) -> float | None:
        start, end = self.events
        with CONTEXTS.active(self.device_id):  # host-side push and pop, outside the events' span
            start.record(self.stream)
            if not self.context_.execute_async_v3(self.stream.handle):
                raise UpdpError("TensorRT execute_async_v3 failed")
            end.record(self.stream)
            end.synchronize()
            return start.time_till(end)

    def release(self) -> None:
        """Free buffers, stream, events and engine in the shared context, then give up this holder's share.

        Safe to call at any time, more than once, and before ``load``. Clears what the last build
        verified, so ``context()`` (and ``identity()``) read the same outside a load as before one.
        """
        self.build_facts = {}
        if not self.holds_context:
            return
        try:
            with CONTEXTS.active(self.device_id):
                for mem in self.buffers:
                    mem.free()
                self.buffers = []
                self.stream = self.events = None
                self.context_ = self.engine = self.runtime = None
        finally:
            self.holds_context = False
            CONTEXTS.release(self.device_id)

    def context(self) -> dict[str, Any]:
        """Device, driver and library versions, build settings, and after a build its verified precision."""
        import pycuda
        import pycuda.driver as cuda
        import tensorrt as trt

        cuda.init()
        dev = cuda.Device(self.device_id)
        major, minor = dev.compute_capability()
        driver = cuda.get_driver_version()
        return {"device": dev.name(), "compute_capability": f"{major}.{minor}", "tensorrt": trt.__version__,
                "cuda_driver": f"{driver // 1000}.{(driver % 1000) // 10}", "pycuda": pycuda.VERSION_TEXT,
                "strongly_typed": self._typed_by_graph(), **self.build_context()}

    def build_context(self) -> dict[str, Any]:
        """What the build settings, and the last build's verification while loaded, add to ``context()``.

        ``builder_optimization_level`` is part of ``identity()`` (it makes another engine); ``timing_cache`` is
        not. ``verified_precision`` and ``layer_precisions`` appear only between a build and ``release``.
        """
        level = "default (3)" if self.optimization_level is None else self.optimization_level
        return {"builder_optimization_level": level,
                "timing_cache": str(self.timing_cache) if self.timing_cache else None, **self.build_facts}


def _has_qdq(network) -> bool:
    import tensorrt as trt

    return any(network.get_layer(i).type == trt.LayerType.QUANTIZE for i in range(network.num_layers))
