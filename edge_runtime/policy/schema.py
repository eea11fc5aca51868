"""The profile schema: one frozen pydantic model per YAML section.

This is a contract other modules code against: keys may be added, never renamed. Each field's
`allowed` text is what an error message tells the user; each docstring says where the key acts.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PositiveInt = Annotated[int, Field(ge=1)]


def key(allowed: str, default: Any = ..., **constraints: Any) -> Any:
    """A field whose `allowed` text explains valid values in error messages."""
    return Field(default, json_schema_extra={"allowed": allowed}, **constraints)


class Section(BaseModel):
    # strict: YAML `"8"` or `true` is not silently an int; extra=forbid: typos are errors;
    # allow_inf_nan=False: YAML `.inf`/`.nan` are no sizes or durations (int(inf) fails downstream).
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _lists_to_tuples(cls, value: Any) -> Any:
        # YAML gives lists; frozen models keep tuples so nobody mutates a shared profile.
        return tuple(value) if isinstance(value, list) else value


class Memory(Section):
    """Budget the planner fits weights and activations into."""

    vram_gib: Optional[float] = key("a number of GiB >= 0, or null for the cpu tier", ge=0)
    reserve_gib: float = key("a number of GiB >= 0 (CUDA context + allocator headroom)", ge=0)

    @model_validator(mode="after")
    def _reserve_below_vram(self) -> Memory:
        if self.vram_gib and self.reserve_gib >= self.vram_gib:
            raise ValueError(f"memory.reserve_gib ({self.reserve_gib}) must be smaller than "
                             f"memory.vram_gib ({self.vram_gib})")
        return self


class Precision(Section):
    """Resolved against the hardware by `dtypes.choose_dtype`."""

    dtype: Literal["auto", "bf16", "fp16", "fp32"] = key("auto, bf16, fp16 or fp32")
    fp32_components: tuple[str, ...] = key("a list of component names kept fp32 under half precision")
    # Token-by-token decoding reads every weight of the autoregressive LM once per token: on a CPU it
    # is bound by memory bandwidth, so bf16 weights (half the bytes) decode ~2x faster even without
    # native bf16 math; compute-bound stages (flow, vocoder) stay in `dtype`. Families opt in.
    cpu_decoder_dtype: Literal["bf16", "fp32"] = key(
        "bf16 or fp32 (weights of a family's autoregressive LM when it runs on the CPU)", default="fp32")


class Offload(Section):
    """How the backend places components that do not fit in VRAM."""

    backend: Literal["auto", "none", "accelerate", "streamer", "deepspeed"] = key(
        "auto, none, accelerate (its own hooks), streamer (accelerate-style hooks with prefetch) or deepspeed")
    target: Literal["cpu", "disk", "nvme"] = key("cpu, disk or nvme")
    pin_memory: bool = key("true or false")
    prefetch: int = key("an integer >= 0 (blocks fetched ahead; 0 = off)", ge=0)
    keep_resident: tuple[str, ...] = key("a list of component names never offloaded")
    offload_dir: Optional[str] = key("a folder path, or null for the user cache dir")

    @model_validator(mode="after")
    def _target_fits_backend(self) -> Offload:
        # accelerate streams from RAM or safetensors on disk; DeepSpeed ZeRO from RAM or NVMe.
        bad = {"accelerate": "nvme", "streamer": "nvme", "deepspeed": "disk"}.get(self.backend)
        if self.target == bad:
            raise ValueError(f"offload.target {bad!r} does not work with offload.backend "
                             f"{self.backend!r}; accelerate and streamer take cpu|disk, deepspeed takes cpu|nvme")
        return self


class Quantization(Section):
    """Weight-only quantization of a family's LM layers, a placement choice made by the planner
    (policy/planner/precision.py): the least lossy plan whose per-frame blocks fit the GPU."""

    allowed: tuple[Literal["int8", "int4"], ...] = key(
        "a list of int8 and/or int4 (precisions the planner may give an LM layer; [] = never quantize)",
        default=("int8", "int4"))
    # Predicted relative output error per layer (policy/quantization.PREDICTED_LAYER_ERROR): a
    # precision predicted to exceed it is not used, whatever the memory.
    max_layer_error: float = key("a number >= 0 (relative error per layer, e.g. 0.02 allows int8 only)",
                                 default=0.2, ge=0)
    force: Optional[Literal["int8", "int4"]] = key(
        "null (the planner decides), int8 or int4 (every quantizable layer, whatever fits)", default=None)


class Cleanup(Section):
    """When the memory governor (memory.py) empties caches and trims the heap."""

    policy: Literal["per_request", "every_n", "threshold", "off"] = key("per_request, every_n, threshold or off")
    every_n: PositiveInt = key("an integer >= 1 (requests between cleanups)")
    fragmentation_threshold: float = key(
        "a number above 0, at most 1: (reserved-allocated)/reserved on CUDA, RSS growth on the CPU", gt=0, le=1)
    malloc_trim: bool = key("true or false")

    @field_validator("policy", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `off` as false; the user meant the policy "off".
        return "off" if value is False else value


class VoiceCache(Section):
    """Bounds of the prepared-voice LRU cache (voices.py)."""

    max_entries: PositiveInt = key("an integer >= 1")
    max_mib: float = key("a number of MiB > 0", gt=0)
    device: Literal["cpu", "cuda"] = key("cpu or cuda")
    library_dir: Optional[str] = key("a folder, an NFS path or an fsspec URL (s3://bucket/voices), or null for "
                                     "the user data dir")
    library_recheck_s: Optional[float] = key(
        "seconds >= 0 between checks that a cached library voice is still in the library (0: every "
        "request), or null for never", default=5.0, ge=0)


class Batching(Section):
    """Micro-batching in the scheduler."""

    max_batch: Union[Literal["auto"], PositiveInt] = key("auto or an integer >= 1")
    max_wait_ms: float = key("a number of milliseconds >= 0", ge=0)


class Limits(Section):
    """Request validation (engine, server) and queueing."""

    max_text_chars: PositiveInt = key("an integer >= 1")
    max_prompt_seconds: float = key("a number of seconds > 0", gt=0)
    queue_size: PositiveInt = key("an integer >= 1")
    request_timeout_s: float = key("a number of seconds > 0", gt=0)


class RuntimeSection(Section):
    """Process-wide settings applied by the engine."""

    # torch/OpenMP crash (SIGSEGV) on the first parallel op with ~100000 threads; 1024 runs (slowly).
    threads: int = key("an integer from 0 to 1024 (0 = every physical core)", ge=0, le=1024)
    reuse_heap: bool = key("true or false", default=False)
    # Idle unload (runtime/idle.py, held by the engine): after this many seconds with no request the
    # model's weights leave the GPU / RAM and are reloaded by the next request, as Ollama's keep_alive.
    keep_alive_s: Optional[float] = key(
        "a number of seconds >= 0 (idle time before the model is unloaded), or 0 / null to never unload",
        default=None, ge=0)


class Replicas(Section):
    """`serve --replicas N` on Ray Serve (serving/replicas): what each model replica asks of the
    cluster, its autoscaling bounds and how requests find a replica."""

    num_cpus: float = key("a number of CPUs >= 0 per replica (fractions allowed: Ray schedules by it)",
                          default=1.0, ge=0)
    # Ray's fractional GPUs are scheduling only: the replica also caps torch at memory_fraction.
    num_gpus: float = key("a number of GPUs >= 0 per replica (0.5: two replicas share a card)", default=0.0, ge=0)
    memory_fraction: Optional[float] = key(
        "a number above 0, at most 1 (share of the card's memory torch may allocate), or null for num_gpus",
        default=None, gt=0, le=1)
    max_ongoing_requests: PositiveInt = key("an integer >= 1 (requests one replica holds at once; more wait "
                                            "in Ray's router)", default=16)
    min_replicas: Optional[int] = key("an integer >= 0 (autoscaling lower bound), or null for a fixed count",
                                      default=None, ge=0)
    max_replicas: Optional[PositiveInt] = key("an integer >= 1 (autoscaling upper bound), or null for a fixed count",
                                              default=None)
    target_ongoing_requests: float = key("a number > 0 (autoscaling adds replicas above this many requests "
                                         "per replica)", default=2.0, gt=0)
    routing: Literal["voice", "default"] = key(
        "voice (requests for a voice go to the replica that has it prepared) or default (least loaded)",
        default="voice")

    @model_validator(mode="after")
    def _bounds_in_order(self) -> Replicas:
        if self.min_replicas is not None and self.max_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"replicas.min_replicas ({self.min_replicas}) must be at most "
                             f"replicas.max_replicas ({self.max_replicas})")
        return self


class Profile(Section):
    """A resolved profile. `source` is the file it came from (set by the loader, not in YAML)."""

    name: str = key("a short name")
    description: str = key("one line of text")
    source: str = key("set by the loader", default="")
    memory: Memory
    precision: Precision
    offload: Offload
    quantization: Quantization = Field(default_factory=Quantization)
    cleanup: Cleanup
    voice_cache: VoiceCache
    batching: Batching
    limits: Limits
    runtime: RuntimeSection
    replicas: Replicas = Field(default_factory=Replicas)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable values (tuples become lists)."""
        return self.model_dump(mode="json")
