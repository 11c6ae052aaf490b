"""Latency from a target that only runs trtexec: export the plans, time them there, import, search.

A target where updp cannot run (an embedded board, a locked-down server with
TensorRT but no Python stack) still drives a search:

1. ``updp latency export MODEL --plans calibration --out DIR`` writes the ONNX
   of every plan the latency model needs (the baseline, each block alone,
   the fit and held-out plans a search with the same settings picks), a
   ``manifest.json`` (plan key -> ONNX file, shape, precision) and
   ``run_trtexec.sh``;
2. on the target, ``sh DIR/run_trtexec.sh`` runs trtexec once per plan and
   writes ``DIR/outputs/KEY.log`` and ``KEY.times.json``;
3. ``updp latency import DIR`` matches every output to its plan through the
   manifest and stores its figures (GPU Compute Time, ms) in the latency
   cache under backend ``trtexec`` with the device name;
4. ``updp search --backend trtexec --latency-device NAME --latency-mode table``
   builds the per-block table and the latency model from those figures only,
   and stops before any training when one is missing.

Unlike the in-process backends, these figures are not interleaved: each is
one trtexec run, absolute milliseconds. trtexec's GPU Compute Time on a
quiet GPU is stable to about 1 %, which the held-out error reports anyway.
"""
from __future__ import annotations

import dataclasses
import json
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from updp import __version__
from updp.core.errors import UpdpError
from updp.core.fileio import atomic_path, write_json
from updp.core.plan import PruningPlan
from updp.latency.base import MeasureConfig
from updp.latency.cache import CacheKey, LatencyCache
from updp.latency.predictor import features_needed, sized_plans
from updp.latency.result import LatencyResult, failure
from updp.latency.trtexec import TrtexecParseError, parse_file
from updp.pruner.spec import BlockSpec
from updp.search.timing import block_groups

BACKEND = "trtexec"
MANIFEST = "manifest.json"
SCRIPT = "run_trtexec.sh"
PLAN_SETS = ("table", "calibration")


# ---------------------------------------------------------------- which plans


def calibration_plans(model: str, specs: Sequence[BlockSpec], fit_plans: int, held_out_plans: int,
                      seed: int) -> tuple[list[PruningPlan], list[PruningPlan]]:
    """The random plans a search times to fit its latency model, and those it checks it on.

    ``specs`` are the blocks whose single-block figures the fit also uses. The fit takes at least
    ``fit_plans`` plans, more when the model's features need them (one more than the features, less
    the single blocks, plus two).
    """
    names = [s.name for s in specs]
    n_fit = max(fit_plans, features_needed(block_groups(specs)) - len(names) + 2)
    plans = sized_plans(model, names, n_fit + held_out_plans, seed=seed)
    return plans[:n_fit], plans[n_fit:]


def needed_plans(model: str, specs: Sequence[BlockSpec], kind: str = "calibration", fit_plans: int = 16,
                 held_out_plans: int = 8, seed: int = 0) -> list[tuple[str, PruningPlan]]:
    """``(role, plan)`` for every plan a latency predictor of ``kind`` needs measured.

    ``table``: the baseline and each block alone (the additive table); ``calibration`` adds the fit
    and held-out plans of the fitted model (none with ``fit_plans`` 0).
    """
    if kind not in PLAN_SETS:
        raise UpdpError(f"unknown plan set '{kind}'; use one of {', '.join(PLAN_SETS)} or a file of plans")
    out = [("baseline", PruningPlan(model))] + [("single", PruningPlan(model, {s.name})) for s in specs]
    if kind == "calibration" and fit_plans:
        fit, held = calibration_plans(model, specs, fit_plans, held_out_plans, seed)
        out += [("fit", p) for p in fit] + [("held_out", p) for p in held]
    return _distinct(out)


def plans_from_file(model: str, path: str | Path, known: Iterable[str]) -> list[tuple[str, PruningPlan]]:
    """The baseline and the plans of a file: a JSON list of block-name lists, or one comma-joined plan per line.

    Raises:
        UpdpError: the file cannot be read, or names a block ``model`` does not have.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UpdpError(f"cannot read plans file '{path}' ({getattr(e, 'strerror', None) or e})") from None
    try:
        data = json.loads(text)
        rows = [PruningPlan(model, frozenset(p)) for p in data] if isinstance(data, list) else None
    except (ValueError, TypeError):
        rows = None
    if rows is None:
        rows = [PruningPlan.from_str(model, line) for line in text.splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    known = set(known)
    unknown = sorted({b for p in rows for b in p if b not in known})
    if unknown:
        raise UpdpError(f"plans file '{path}': {model} has no prunable block {', '.join(unknown[:5])}"
                        f"{' ...' if len(unknown) > 5 else ''}; list its blocks with 'updp blocks {model}'")
    return _distinct([("baseline", PruningPlan(model))] + [("extra", p) for p in rows])


def _distinct(entries: list[tuple[str, PruningPlan]]) -> list[tuple[str, PruningPlan]]:
    seen: set[PruningPlan] = set()
    out = []
    for role, plan in entries:
        if plan not in seen:
            seen.add(plan)
            out.append((role, plan))
    return out


# ---------------------------------------------------------------- export


@dataclass(frozen=True)
class Manifest:
    """What an export holds: one ONNX file per plan, all of one model, shape, batch and precision."""

    model: str
    input_shape: tuple[int, ...]
    batch_size: int
    precision: str
    num_classes: int | None
    plans: list[dict] = field(default_factory=list)  # {"key", "role", "pruned": [names], "onnx": path}
    command: str = ""
    updp: str = __version__

    @classmethod
    def load(cls, directory: str | Path) -> "Manifest":
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise UpdpError(f"'{directory}' has no {MANIFEST}: give the folder 'updp latency export' wrote")
        try:
            data = json.loads(path.read_text())
            data["input_shape"] = tuple(data["input_shape"])
            return cls(**data)
        except (ValueError, TypeError, KeyError) as e:
            raise UpdpError(f"'{path}' is not a manifest updp wrote ({type(e).__name__}: {e})") from None

    def plan(self, entry: dict) -> PruningPlan:
        return PruningPlan(self.model, frozenset(entry["pruned"]))


def onnx_dtype(precision: str) -> str:
    """fp16 is in the graph itself (float16 ONNX), so one file builds strongly typed on TensorRT 10 and 11."""
    return "float16" if precision == "fp16" else "float32"


def export_plans(base, entries: Sequence[tuple[str, PruningPlan]], out_dir: str | Path, cfg: MeasureConfig,
                 num_classes: int | None, command: str, progress=None) -> Manifest:
    """ONNX of each plan merged from ``base``, ``manifest.json`` and ``run_trtexec.sh`` in ``out_dir``.

    An ONNX file already written by an earlier export of the same settings is kept, so a stopped
    export resumes.

    Raises:
        UpdpError: ``out_dir`` holds an export of another model, shape, batch or precision.
    """
    from updp.core.onnx_export import export_onnx
    from updp.pruner import merge_model

    out = Path(out_dir)
    model = entries[0][1].model
    manifest = Manifest(model, tuple(cfg.input_shape), cfg.batch_size, cfg.precision, num_classes,
                        [{"key": p.key, "role": role, "pruned": list(p.names), "onnx": f"onnx/{p.key}.onnx"}
                         for role, p in entries], command)
    if (out / MANIFEST).is_file():
        old = Manifest.load(out)
        if (old.model, old.input_shape, old.batch_size, old.precision) != (model, manifest.input_shape,
                                                                           cfg.batch_size, cfg.precision):
            raise UpdpError(f"'{out}' holds an export of {old.model} ({_shape(old)}, {old.precision}); "
                            "give another --out")
    (out / "onnx").mkdir(parents=True, exist_ok=True)
    half = cfg.precision == "fp16"
    for _role, plan in entries:
        path = out / "onnx" / f"{plan.key}.onnx"
        if not path.is_file():
            export_onnx(merge_model(base, plan) if plan else base.eval(), cfg.full_shape, path, half=half)
        if progress is not None:
            progress()
    write_json(out / MANIFEST, {**dataclasses.asdict(manifest), "input_shape": list(manifest.input_shape)})
    with atomic_path(out / SCRIPT) as tmp:
        tmp.write_text(trtexec_script(manifest))
    (out / SCRIPT).chmod(0o755)
    return manifest


def _shape(m: Manifest) -> str:
    return "x".join(map(str, (m.batch_size, *m.input_shape)))


def trtexec_script(manifest: Manifest) -> str:
    """A POSIX shell script that runs trtexec on every plan of ``manifest`` and keeps each output.

    Precision: fp32 needs no flag. fp16 is a float16 ONNX: TensorRT 11 is always strongly typed
    (its --fp16/--int8/--best flags are gone), TensorRT 10 builds it strongly typed with
    ``--stronglyTyped``. int8 takes ``--int8 --fp16`` on TensorRT 10 (timing only: no calibration
    data); TensorRT 11 needs an ONNX with Q/DQ nodes (ModelOpt), so the script refuses it. The shape
    is fixed in the ONNX (exported for one static input), so no ``--shapes`` is passed.
    """
    keys = [e["key"] for e in manifest.plans]
    lines = [
        "#!/bin/sh",
        f"# Written by updp {manifest.updp}: {manifest.command}",
        f"# Times {len(keys)} plans of {manifest.model} (input {_shape(manifest)}, {manifest.precision}) "
        "with trtexec.",
        "# Run it on the target GPU:   sh run_trtexec.sh",
        "# then copy this folder back:  updp latency import DIR",
        "# Environment: TRTEXEC (default: trtexec on PATH); TRT_MAJOR (10 or 11; default: read from the",
        "# banner of 'trtexec --help'); TRTEXEC_FLAGS (added to every run, e.g. \"--useCudaGraph --useSpinWait\").",
        "# A plan whose log already has a performance summary is skipped: a stopped run resumes.",
        "set -u",
        'cd "$(dirname "$0")" || exit 1',
        'TRTEXEC=${TRTEXEC:-trtexec}',
        f"PRECISION={manifest.precision}",
        'if [ -z "${TRT_MAJOR:-}" ]; then',
        "  # [TensorRT v101601] is 10.16.1 (major x 10000), [TensorRT v8203] is 8.2.3 (major x 1000)",
        '  v=$("$TRTEXEC" --help 2>&1 | sed -n \'s/.*\\[TensorRT v\\([0-9][0-9]*\\)\\].*/\\1/p\' | head -n 1)',
        '  if [ -n "$v" ]; then',
        '    if [ "$v" -ge 100000 ]; then TRT_MAJOR=$((v / 10000)); else TRT_MAJOR=$((v / 1000)); fi',
        "  fi",
        "fi",
        'case "${TRT_MAJOR:-}" in',
        "  ''|*[!0-9]*) echo \"run_trtexec.sh: cannot tell the TensorRT version from '$TRTEXEC --help';"
        " set TRT_MAJOR=10 or 11\" >&2; exit 2;;",
        "esac",
        'case "$PRECISION" in',
        '  fp32) PRECISION_FLAGS="";;',
        '  fp16) if [ "$TRT_MAJOR" -ge 11 ]; then PRECISION_FLAGS=""; elif [ "$TRT_MAJOR" -ge 10 ]; then '
        'PRECISION_FLAGS="--stronglyTyped"; else PRECISION_FLAGS="--fp16"; fi;;',
        '  int8) if [ "$TRT_MAJOR" -ge 11 ]; then',
        '          echo "run_trtexec.sh: TensorRT 11 has no --int8: quantize the ONNX with ModelOpt (Q/DQ nodes)"'
        ' >&2; exit 2',
        '        fi',
        '        PRECISION_FLAGS="--int8 --fp16";;',
        "esac",
        "mkdir -p outputs",
        f"total={len(keys)}; n=0; ran=0; kept=0; failed=0",
        "run() {",
        "  n=$((n + 1))",
        '  log="outputs/$1.log"',
        '  if [ -f "$log" ] && grep -q "Performance summary" "$log"; then kept=$((kept + 1)); return 0; fi',
        '  echo "[$n/$total] $1"',
        '  # shellcheck disable=SC2086 (the flags are split on purpose)',
        '  if "$TRTEXEC" --onnx="onnx/$1.onnx" --exportTimes="outputs/$1.times.json" '
        '--timingCacheFile=timing.cache $PRECISION_FLAGS ${TRTEXEC_FLAGS:-} > "$log.part" 2>&1; then',
        '    mv "$log.part" "$log"; ran=$((ran + 1))',
        "  else",
        '    mv "$log.part" "outputs/$1.failed.log"; failed=$((failed + 1))',
        '    echo "  trtexec failed: see outputs/$1.failed.log" >&2',
        "  fi",
        "}",
        *[f"run {k}" for k in keys],
        'echo "run_trtexec.sh: $ran timed, $kept already done, $failed failed (TensorRT $TRT_MAJOR, $PRECISION)"',
        '[ "$failed" -eq 0 ]',
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- import


@dataclass
class ImportReport:
    """What ``import_outputs`` stored, what it could not read and which plans have no output yet."""

    model: str
    stored: list[tuple[PruningPlan, LatencyResult]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # plan key -> why
    missing: list[PruningPlan] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # output files no plan of the manifest claims
    devices: set[str] = field(default_factory=set)


def import_outputs(directory: str | Path, cache: LatencyCache | None, device: str | None = None) -> ImportReport:
    """Every trtexec log (else ``--exportTimes`` JSON) in ``directory/outputs``, matched to its plan.

    Shape, batch and precision come from the manifest (what the ONNX was exported with: a strongly
    typed log has no precision flag to read). The device name is ``device`` when given, else the log's; an
    ``--exportTimes`` JSON alone (no device in it) takes the one device the export's logs name.

    Raises:
        UpdpError: no manifest, or a figure with no device name and no ``device`` given.
    """
    directory = Path(directory)
    manifest = Manifest.load(directory)
    outputs = directory / "outputs"
    report = ImportReport(manifest.model)
    keys = {e["key"] for e in manifest.plans}
    if outputs.is_dir():
        report.ignored = sorted(p.name for p in outputs.iterdir()
                                if p.is_file() and p.name.split(".")[0] not in keys)
    overrides = {"precision": manifest.precision, "batch_size": manifest.batch_size,
                 "input_shape": manifest.input_shape}
    parsed = []
    for entry in manifest.plans:
        plan = manifest.plan(entry)
        files = [f for f in (outputs / f"{entry['key']}.log", outputs / f"{entry['key']}.times.json") if f.is_file()]
        if not files:
            report.missing.append(plan)
            continue
        try:
            result = parse_file(files[0], **overrides)
            _check_onnx_of(result, entry)
        except TrtexecParseError as e:
            report.failed[entry["key"]] = str(e)
            continue
        parsed.append((plan, files[0], result))
    logged = {r.context["device"] for _, _, r in parsed if r.context.get("device")}
    fallback = device or (logged.pop() if len(logged) == 1 else None)  # one export, one target
    for plan, path, result in parsed:
        name = device or result.context.get("device") or fallback
        if not name:
            raise UpdpError(f"'{path}' names no device (an --exportTimes file has none); pass --device NAME")
        result = dataclasses.replace(result, context={**result.context, "device": name})
        report.devices.add(name)
        if cache is not None:
            cache.put(import_key(manifest, plan, result), result)
        report.stored.append((plan, result))
    return report


def _check_onnx_of(result: LatencyResult, entry: dict) -> None:
    """A log whose command built another plan's ONNX is refused (a renamed or mixed-up file)."""
    command = result.context.get("command") or ""
    for arg in shlex.split(command) if command else []:
        if arg.startswith("--onnx=") and Path(arg[7:]).name != Path(entry["onnx"]).name:
            raise TrtexecParseError(f"the log times '{arg[7:]}', not this plan's {entry['onnx']}")


def import_key(manifest: Manifest, plan: PruningPlan, result: LatencyResult) -> CacheKey:
    version = str(result.context.get("tensorrt_version", "unknown"))
    return CacheKey(plan.key, manifest.model, tuple(manifest.input_shape), manifest.batch_size, manifest.precision,
                    BACKEND, result.context["device"], (("tensorrt", version),))


# ---------------------------------------------------------------- search


class ImportedTimer:
    """The plan timer of ``--backend trtexec``: figures imported from trtexec runs; nothing is timed here.

    It holds the newest imported figure of each plan of ``model`` at this input shape, batch and
    precision on ``device``.

    Raises:
        UpdpError: no figure was imported for ``device`` (the message lists the devices that have some).
    """

    backend_name = BACKEND

    def __init__(self, model_name: str, cfg: MeasureConfig, cache: LatencyCache, device: str | None):
        self.model_name, self.cfg, self.cache = model_name, cfg, cache
        if not device:
            raise UpdpError("--backend trtexec needs --latency-device NAME: the GPU the imported figures were "
                            "timed on (as 'updp latency import' printed it)")
        self.device = device
        match = {"model": model_name, "input_shape": list(cfg.input_shape), "batch_size": cfg.batch_size,
                 "precision": cfg.precision, "backend": BACKEND}
        self.figures: dict[str, LatencyResult] = {}
        versions = set()
        others = set()
        for key, result in cache.find_all(**match):  # oldest first: the newest import of a plan wins
            if key.device != device:
                others.add(key.device)
                continue
            self.figures[key.plan_key] = result
            versions.add(str(result.context.get("tensorrt_version", "unknown")))
        if not self.figures:
            where = f"figures exist for: {', '.join(sorted(others))}" if others else "none is imported for this model"
            raise UpdpError(f"no trtexec figure of {model_name} ({'x'.join(map(str, cfg.full_shape))}, "
                            f"{cfg.precision}) was imported for device '{device}' in {cache.path} ({where}); "
                            "see 'updp latency export --help'")
        if len(versions) > 1:
            raise UpdpError(f"the figures imported for '{device}' come from several TensorRT versions "
                            f"({', '.join(sorted(versions))}): their ratios do not compare; import one version's "
                            "runs into a fresh cache (--latency-cache FILE)")
        self.versions = (("tensorrt", versions.pop()),)

    def lookup(self, plan: PruningPlan) -> LatencyResult | None:
        return self.figures.get(plan.key)

    def missing(self, plans: Iterable[PruningPlan]) -> list[PruningPlan]:
        return [p for p in plans if p.key not in self.figures]

    def measure(self, plan: PruningPlan) -> LatencyResult:
        return self.lookup(plan) or failure(f"no trtexec figure imported for plan {plan} on {self.device}",
                                            backend=BACKEND, precision=self.cfg.precision,
                                            batch_size=self.cfg.batch_size, input_shape=tuple(self.cfg.input_shape))

    def measure_many(self, plans: Sequence[PruningPlan], rounds: int = 20) -> list[LatencyResult]:
        """Each plan's imported figure (or a failure record): absolute ms, not one interleaved pass."""
        return [self.measure(p) for p in plans]

    def require(self, entries: Sequence[tuple[str, PruningPlan]], export_command: str) -> None:
        """Stop (before any training) when a plan the predictor needs has no imported figure.

        Raises:
            UpdpError: one line naming the missing plans and the commands that produce them.
        """
        missing = self.missing(p for _, p in entries)
        if not missing:
            return
        roles = {p: r for r, p in entries}
        shown = "; ".join(f"{roles[p]} {p}" for p in missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise UpdpError(f"{len(missing)} of the {len(entries)} plans the latency predictor needs have no trtexec "
                        f"figure for '{self.device}' ({shown}): run '{export_command}', then 'sh DIR/{SCRIPT}' on "
                        f"the target and 'updp latency import DIR'")
