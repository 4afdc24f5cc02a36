"""Compile options: frozen, validated on construction, no free-form dicts."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from pathlib import Path

from q4c.errors import ConfigError

#: Bit widths with an ONNX storage type q4c emits (3 is stored in 4 bits, counted as 3).
SUPPORTED_BITS = (2, 3, 4, 8)
#: Widths a budgeted plan may also choose for the weights ONNX Runtime only dequantizes (Conv,
#: LSTM/GRU/RNN), whose codes are decoded by constant folding at session load: 6-bit codes stored
#: as a 4-bit high plane and a 2-bit low plane (q4c.quant.planes). Not a --bits width.
PLANE_BITS = (6,)
#: --candidates when not given: with --require also PLANE_BITS (every plan that search picks is
#: measured on held-out samples, so a finer menu cannot make its result worse unseen)
DEFAULT_CANDIDATES = (2, 3, 4, 8)
REQUIRE_CANDIDATES = (2, 3, 4, 6, 8)
#: Rounding schemes with uniform levels (scale x integer code) and non-uniform codebooks (an index
#: into a small table of centroids: q4c.quant.codebook); codebooks also store 1-bit indices.
UNIFORM_SCHEMES = ("symmetric", "symmetric-absmax", "gptq")
CODEBOOK_SCHEMES = ("mulaw", "kmeans", "nf4")
CODEBOOK_BITS = (1, 2, 3, 4)
BLOCK_SIZES = (16, 32, 64, 128, 256)


class Target(enum.Enum):
    ORT_CPU = "ort-cpu"  # forms ONNX Runtime's CPU provider runs fast (MatMulNBits, ...)
    ONNX = "onnx"  # standard ONNX only: DequantizeLinear feeding the float op


class WorkerBackend(enum.Enum):
    """Where measure-sensitivity scores: threads of this process, or Ray workers (q4c.distributed)."""

    THREADS = "threads"
    RAY = "ray"


class Kernels(enum.StrEnum):
    """--kernels: which ONNX Runtime forms MatMul/embedding weights take (see CompileOptions.kernels)."""

    AUTO = "auto"
    LOW_BIT = "low-bit"
    FP32_AT_LOAD = "fp32-at-load"


class Activations(enum.StrEnum):
    NONE = "none"
    INT8 = "int8"


class Observer(enum.StrEnum):
    """How calibration picks activation ranges."""

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"


class GranularityKind(enum.StrEnum):
    CHANNEL = "channel"
    BLOCK = "block"
    TENSOR = "tensor"


def _member(cls: type[enum.StrEnum], value: object, what: str):  # returns a member of cls
    """A StrEnum member from its value (members equal their strings, so comparisons with
    literals keep working), or a one-line ConfigError."""
    try:
        return cls(value)
    except ValueError:
        raise ConfigError(f"{what} must be one of {', '.join(m.value for m in cls)}, not {value!r}") from None


#: samples of --calib DATA / the reader used when --calib-samples is not given; with --require
#: more (the requirement is judged on the held-out half, and its bound narrows with more units)
DEFAULT_CALIB_SAMPLES = 32
REQUIRE_CALIB_SAMPLES = 128


@dataclass(frozen=True)
class Granularity:
    """How scales are shared: one per output channel, or one per `block` along the reduction axis.

    `block=0` is "auto": 32 where scales are stored in float16 (weights ONNX Runtime only
    dequantizes: LSTM, GRU, Conv), 64 where its low-bit kernels need float32 scales (MatMulNBits,
    GatherBlockQuantized); either way scales cost 0.5 bit per weight.
    """

    kind: GranularityKind = GranularityKind.BLOCK
    block: int = 0

    def __post_init__(self) -> None:
        if self.kind not in tuple(GranularityKind):
            raise ConfigError(f"granularity must be channel, tensor or block:N, not {self.kind!r}")
        object.__setattr__(self, "kind", GranularityKind(self.kind))
        if self.kind == "block" and self.block != 0 and self.block not in BLOCK_SIZES:
            raise ConfigError(f"block size must be one of {', '.join(map(str, BLOCK_SIZES))}, not {self.block}")

    @classmethod
    def parse(cls, text: str) -> Granularity:
        text = text.strip()
        if text.startswith("block"):
            _, _, size = text.partition(":")
            try:
                return cls("block", 0 if size in ("", "auto") else int(size))
            except ValueError:
                raise ConfigError(f"granularity block:N needs an integer N, not {size!r}") from None
        return cls(text, 0)

    def __str__(self) -> str:
        if self.kind == "block":
            return f"block:{self.block or 'auto'}"
        return self.kind

    def resolve(self, float32_scales: bool) -> Granularity:
        """Auto block size made concrete for a weight whose scales are float32 or float16."""
        if self.kind == "block" and self.block == 0:
            return Granularity("block", 64 if float32_scales else 32)
        return self


#: --objective kinds (q4c.objectives.OBJECTIVES) and --scoring modes
SCORING_OBJECTIVES = ("kl", "bce", "snr", "ignore")
SCORING_MODES = ("auto", "closed-loop", "open-loop")

#: --kernels choices (see CompileOptions.kernels)
KERNELS = tuple(k.value for k in Kernels)


@dataclass(frozen=True)
class CompileOptions:
    """Everything `q4c compile` can be told. Defaults give a good result on their own."""

    bits: int | None = None  # uniform precision; None = sensitivity-guided under a budget
    #: budget, at most one of: average code bits (scale overhead at the default granularity is
    #: added on top, so uniform 4-bit fits --avg-bits 4 exactly), bytes, or a fraction of FP32
    avg_bits: float | None = None
    size_budget: int | None = None
    ratio: float | None = None
    candidates: tuple[int, ...] | None = None  # None: DEFAULT_CANDIDATES, with requirements REQUIRE_CANDIDATES
    sensitivity: str = "kl"  # kl | hessian | mse
    granularity: Granularity = field(default_factory=Granularity)
    target: Target = Target.ORT_CPU
    #: Weights with fewer elements than this stay float: scales would cost more than they save.
    min_elements: int = 1024
    plan_path: Path | None = None
    keep_fp32: frozenset[str] = frozenset()
    seed: int = 0
    #: "int8": uint8 Q/DQ on MatMul/Gemm/Conv activations, ranges from calibration (W8A8 there)
    activations: Activations = Activations.NONE
    #: how calibration picks activation ranges: minmax | percentile | entropy | mse
    observer: Observer = Observer.PERCENTILE
    #: at most this many samples of --calib DATA are used
    calib_samples: int = DEFAULT_CALIB_SAMPLES
    #: --load-calib: replay a calibration table instead of calibrating
    calib_table: Path | None = None
    #: ort-cpu only: "low-bit" keeps MatMulNBits / GatherBlockQuantized (4-bit weights in memory,
    #: float32 scales); "fp32-at-load" feeds every weight through DequantizeLinear with float16
    #: scales, which ONNX Runtime folds to FP32 at session load; "auto" builds both, times them on
    #: the sample input and keeps the faster.
    kernels: Kernels = Kernels.AUTO
    #: rounding scheme of a uniform (--bits) plan: "symmetric" (nearest level, MSE-chosen
    #: clipping), "symmetric-absmax" (no clipping) or "gptq" (error-compensating rounding against
    #: the calibration inputs; weights it cannot serve, embeddings and convolutions, stay
    #: "symmetric"). Budgeted plans choose each tensor's scheme by measurement (kl).
    scheme: str = "symmetric"
    #: --schemes: the rounding schemes a budgeted plan may choose from, per tensor by measurement
    #: (uniform and codebook ones; () = all that apply)
    schemes: tuple[str, ...] = ()
    #: threads that score tensors in measure-sensitivity (0: one per CPU, at most 4)
    workers: int = 0
    #: threads, or Ray workers (then `workers` counts Ray actors, 0: one per CPU of the cluster)
    workers_backend: WorkerBackend = WorkerBackend.THREADS
    #: Ray cluster to join (None: $RAY_ADDRESS if set, else a local Ray started for the compile)
    ray_address: str | None = None
    #: compile a model whose weights hold NaN or infinite values (refused otherwise); those
    #: weights stay float, with a warning
    allow_nonfinite: bool = False
    #: --objective OUTPUT=KIND overrides, as (output, kind) pairs; KIND in kl, bce, snr, ignore
    #: (see q4c.objectives; outputs not named get the objective their graph implies)
    objectives: tuple[tuple[str, str], ...] = ()
    #: how sensitivity runs a stateful model's sequences: "closed-loop" (the quantized model's own
    #: state fed back call after call), "open-loop" (each call gets the FP32 state), "auto"
    #: (closed loop when the samples are sequences and the model has state pairs)
    scoring: str = "auto"
    #: --require quality requirements, e.g. "flips<=0.5%" (see q4c.requirements)
    requirements: tuple[str, ...] = ()
    #: --latency-budget: "0.6" (x the FP32 model's time on the sample input) or "12ms"; the
    #: choose-forms pass then picks bits x form per layer under both budgets (q4c.latency)
    latency_budget: str | None = None

    @property
    def resolved_workers(self) -> int:
        return self.workers if self.workers > 0 else min(os.cpu_count() or 1, 4)

    @property
    def kernel_scales(self) -> bool:
        """Do weights ONNX Runtime's low-bit kernels read (MatMul, embeddings) get the float32
        scales those kernels need? Not when every weight is folded at load."""
        return self.kernels != "fp32-at-load"

    def __post_init__(self) -> None:
        if self.bits is not None and self.bits not in SUPPORTED_BITS and not (
                self.scheme in CODEBOOK_SCHEMES and self.bits in CODEBOOK_BITS):
            raise ConfigError(f"--bits must be one of {', '.join(map(str, SUPPORTED_BITS))} "
                              f"(1-4 with a codebook --scheme), not {self.bits}")
        if self.bits is not None and self.scheme in CODEBOOK_SCHEMES and self.bits not in CODEBOOK_BITS:
            raise ConfigError(f"--scheme {self.scheme} stores 1-4 bit indices (nf4: 2-4), not --bits {self.bits}")
        if self.bits == 1 and self.scheme == "nf4":
            raise ConfigError("--scheme nf4 stores 2-4 bit indices, not --bits 1")
        unknown = [s for s in self.schemes if s not in (*UNIFORM_SCHEMES, *CODEBOOK_SCHEMES)]
        if unknown:
            raise ConfigError(f"--schemes: {unknown[0]!r} is not a scheme (one of "
                              f"{', '.join((*UNIFORM_SCHEMES, *CODEBOOK_SCHEMES))})")
        if self.avg_bits is not None and not 1.0 <= self.avg_bits <= 16.0:
            raise ConfigError(f"--avg-bits must be between 1 and 16, not {self.avg_bits}")
        budgets = [b for b in (self.avg_bits, self.size_budget, self.ratio) if b is not None]
        if len(budgets) > 1:
            raise ConfigError("give at most one of --avg-bits, --size-budget, --ratio")
        if self.bits is not None and budgets:
            raise ConfigError("--bits is uniform precision; it excludes --avg-bits, --size-budget and --ratio")
        if self.size_budget is not None and self.size_budget <= 0:
            raise ConfigError(f"--size-budget must be a positive number of bytes, not {self.size_budget}")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ConfigError(f"--ratio must be in (0, 1], not {self.ratio}")
        if self.candidates is None:
            object.__setattr__(self, "candidates", REQUIRE_CANDIDATES if self.requirements else DEFAULT_CANDIDATES)
        codebooks = not self.schemes or any(s in CODEBOOK_SCHEMES for s in self.schemes)
        widths = (*SUPPORTED_BITS, *PLANE_BITS)
        if not self.candidates or any(b not in widths and not (codebooks and b in CODEBOOK_BITS)
                                      for b in self.candidates):
            raise ConfigError(f"--candidates must be a non-empty subset of {', '.join(map(str, sorted(widths)))} "
                              f"(and 1 when --schemes allows a codebook), not {', '.join(map(str, self.candidates))}")
        if self.sensitivity not in ("kl", "hessian", "mse"):
            raise ConfigError(f"--sensitivity must be kl, hessian or mse, not {self.sensitivity!r}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0 (0 = one per CPU), not {self.workers}")
        if self.scheme not in (*UNIFORM_SCHEMES, *CODEBOOK_SCHEMES):
            raise ConfigError(f"scheme must be one of {', '.join((*UNIFORM_SCHEMES, *CODEBOOK_SCHEMES))}, "
                              f"not {self.scheme!r}")
        object.__setattr__(self, "kernels", _member(Kernels, self.kernels, "kernels"))
        if self.min_elements < 0:
            raise ConfigError(f"min_elements must be >= 0, not {self.min_elements}")
        object.__setattr__(self, "activations", _member(Activations, self.activations, "--activations"))
        object.__setattr__(self, "observer", _member(Observer, self.observer, "--observer"))
        if not isinstance(self.allow_nonfinite, bool):
            raise ConfigError(f"allow_nonfinite must be True or False, not {self.allow_nonfinite!r}")
        for output, kind in self.objectives:
            if kind not in SCORING_OBJECTIVES:
                raise ConfigError(f"--objective {output}={kind}: the objective must be one of "
                                  f"{', '.join(SCORING_OBJECTIVES)}")
        if self.requirements:
            from q4c.requirements import parse_requirement

            for text in self.requirements:
                try:
                    parse_requirement(text)
                except ValueError as e:
                    raise ConfigError(f"--require: {e}") from None
            if self.bits is not None or self.plan_path is not None:
                raise ConfigError("--require chooses the plan; it excludes --bits and --plan")
        if self.latency_budget is not None:
            from q4c.latency.budget import latency_budget_seconds  # a leaf: the planner imports config

            try:
                latency_budget_seconds(self.latency_budget, 1.0)
            except ValueError:
                raise ConfigError(f"--latency-budget must be a positive ratio to FP32 (0.6) or milliseconds (12ms), "
                                  f"not {self.latency_budget!r}") from None
            if self.plan_path is not None or self.target is not Target.ORT_CPU:
                raise ConfigError("--latency-budget plans forms for --target ort-cpu; it excludes --plan")
        if self.scoring not in SCORING_MODES:
            raise ConfigError(f"--scoring must be one of {', '.join(SCORING_MODES)}, not {self.scoring!r}")
        if self.calib_samples < 1:
            raise ConfigError(f"calib_samples must be >= 1, not {self.calib_samples}")
