"""The model registry: which models a worker serves, read from a TOML file (no torch here).

```toml
[defaults]                 # model per task type when a request names none
classify = "sentiment"
translate = "en-de"
qa = "squad"

[models.sentiment]
task = "classify"
source = "distilbert/distilbert-base-uncased-finetuned-sst-2-english"   # hub id or local path

[models.en-de]
task = "translate"
source = "Helsinki-NLP/opus-mt-en-de"
languages = ["en-de"]      # source-target pairs this model serves

[models.squad]
task = "qa"
source = "./models/tiny-squad"   # relative paths are relative to this file
dtype = "int8"                   # auto | float32 | bfloat16 | float16 | int8 (CPU: int8 linear layers)
```

The API uses the registry to reject unknown models and unsupported language pairs before anything is
enqueued; the worker uses it to load models (`pagedq.worker.registry`).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from pagedq.shared.errors import ModelNotFound, UnsupportedLanguagePair
from pagedq.shared.models import QARequest, TaskRequest, TaskType, TranslateRequest
from pagedq.shared.settings import IntraOpThreads

Architecture = Literal["sequence-classification", "question-answering", "seq2seq", "causal-lm"]

_DEFAULT_ARCH: dict[tuple[TaskType, str | None], Architecture] = {
    (TaskType.CLASSIFY, None): "sequence-classification",
    (TaskType.TRANSLATE, None): "seq2seq",
    (TaskType.QA, None): "question-answering",
    (TaskType.QA, "extractive"): "question-answering",
    (TaskType.QA, "generative"): "causal-lm",
}


class ModelSpec(BaseModel):
    """One registry entry."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    task: TaskType
    source: str = Field(description="Hugging Face hub id, or a local directory saved with save_pretrained.")
    architecture: Architecture | None = Field(None, description="Model class; default from the task.")
    mode: Literal["extractive", "generative"] | None = Field(None, description="QA only.")
    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8"] = Field(
        "auto",
        description=(
            "Weights and compute: auto (fp32 on CPU, bf16/fp16 on CUDA), float32, bfloat16, float16, or int8: "
            "CPU only, fp32 weights quantized at load to int8 linear layers (per-channel weights, per-token "
            "activations; pagedq.worker.engine.cpu.quantization), activations between layers fp32."
        ),
    )
    kv_cache_dtype: Literal["auto", "bfloat16"] = Field(
        "auto",
        description=(
            "Generative models (causal-lm, seq2seq): what the paged KV cache stores. auto: the model's dtype "
            "(exact); bfloat16: K/V rounded to bf16 for an fp32 or int8 model -- half the KV memory and the "
            "bytes a decode step reads, at a stated accuracy cost (README, Precision); the engine then equals "
            "the model run with a cache that rounds its K/V to bf16 (pagedq.worker.engine.paged.kv_dtype)."
        ),
    )
    device: str | None = Field(None, description="Overrides PAGEDQ_DEVICE for this model.")
    intra_op_threads: IntraOpThreads | None = Field(
        None,
        description=(
            "CPU threads that split one engine step's matrix products for this model (torch's intra-op threads), "
            "or \"auto\": torch's count after a step below the engine's request cap; after a saturated one the "
            "engine measures 1, 2, 4, .. up to torch's count per step size and runs the next with the fewest "
            "threads within 5% of the fastest (pagedq.worker.engine.threads). Default: PAGEDQ_INTRA_OP_THREADS "
            "(itself \"auto\" by default). A small model on a worker whose cores "
            "also run the queue serves bulk work faster on fewer (a split product waits for its slowest "
            "thread) and single tasks slower (README, W5: +24% and -12% for the demo classifier on 2 cores)."
        ),
    )
    revision: str | None = None
    languages: list[str] = Field(default_factory=list, description="Translation: 'src-tgt' pairs served.")
    prompt_template: str | None = Field(None, description="Causal LMs: prompt with {context}/{question}/{text}...")
    prefix_caching: bool = True
    max_input_tokens: int | None = Field(None, gt=0, description="Default: the model's maximum.")

    @model_validator(mode="after")
    def _fill(self) -> ModelSpec:
        if self.architecture is None:
            key = (self.task, self.mode if self.task is TaskType.QA else None)
            self.architecture = _DEFAULT_ARCH[key]
        if self.task is TaskType.QA and self.mode is None:
            self.mode = "generative" if self.architecture in ("causal-lm", "seq2seq") else "extractive"
        if self.kv_cache_dtype != "auto" and self.architecture not in ("causal-lm", "seq2seq"):
            raise ValueError(f"kv_cache_dtype applies to causal-lm and seq2seq models, not {self.architecture}")
        if self.kv_cache_dtype == "bfloat16" and self.dtype == "float16":
            raise ValueError("kv_cache_dtype 'bfloat16' narrows fp32 and int8 models; a float16 model keeps 'auto'")
        if self.dtype == "int8" and self.device is not None and not self.device.startswith("cpu"):
            raise ValueError(f"dtype 'int8' runs on CPU only, not on device {self.device!r} (use bfloat16 there)")
        for pair in self.languages:
            if pair.count("-") != 1 or not all(pair.split("-")):
                raise ValueError(f"language pair {pair!r} must look like 'en-de'")
        return self

    def serves_pair(self, source: str | None, target: str | None) -> bool:
        if not self.languages or (source is None and target is None):
            return True
        return any(
            (source is None or s == source) and (target is None or t == target)
            for s, t in (p.split("-") for p in self.languages)
        )


#: The model fields a worker publishes (what request validation needs, and where the model comes from).
PUBLISHED_FIELDS = {"task", "source", "architecture", "mode", "languages"}


class Registry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: dict[str, ModelSpec]
    defaults: dict[TaskType, str] = Field(default_factory=dict)
    base_dir: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _check(self) -> Registry:
        for name, spec in self.models.items():
            spec.name = name
        for task, name in self.defaults.items():
            if name not in self.models:
                raise ValueError(f"default {task.value} model {name!r} is not in [models]")
            if self.models[name].task is not task:
                raise ValueError(f"default {task.value} model {name!r} serves {self.models[name].task.value}")
        return self

    @classmethod
    def load(cls, path: str | Path) -> Registry:
        path = Path(path)
        with path.open("rb") as f:
            data = tomllib.load(f)
        return cls.model_validate({**data, "base_dir": path.parent.resolve()})

    def resolve_source(self, spec: ModelSpec) -> str:
        """A local path relative to the registry file, or the hub id unchanged."""
        if self.base_dir is not None and (spec.source.startswith(".") or spec.source.startswith("/")):
            return str((self.base_dir / spec.source).resolve())
        return spec.source

    def select(self, task: TaskType, request: TaskRequest) -> ModelSpec:
        """The model that serves `request`, or a ModelNotFound / UnsupportedLanguagePair error."""
        if request.model is not None:
            spec = self.models.get(request.model)
            if spec is None:
                raise ModelNotFound(f"unknown model {request.model!r}; known: {sorted(self.models)}")
            if spec.task is not task:
                raise ModelNotFound(f"model {request.model!r} serves {spec.task.value}, not {task.value}")
            self._check_request(spec, request)
            return spec
        candidates = [s for s in self.models.values() if s.task is task]
        if isinstance(request, TranslateRequest):
            candidates = [s for s in candidates if s.serves_pair(request.source_lang, request.target_lang)]
            if not candidates:
                raise UnsupportedLanguagePair(
                    f"no model translates {request.source_lang or '*'} -> {request.target_lang or '*'}"
                )
        if isinstance(request, QARequest) and request.mode is not None:
            candidates = [s for s in candidates if s.mode == request.mode]
        if not candidates:
            raise ModelNotFound(f"no {task.value} model is registered for this request")
        default = self.defaults.get(task)
        return next((s for s in candidates if s.name == default), candidates[0])

    def published(self, refused: Mapping[str, str] | None = None) -> dict[str, Any]:
        """What a worker publishes in its lease (JSON): the models it serves (not those in `refused`), what a
        producer needs to validate requests against them, and the refused ones with the reason."""
        refused = dict(refused or {})
        served = {name: spec for name, spec in self.models.items() if name not in refused}
        return {
            "models": {name: spec.model_dump(mode="json", include=PUBLISHED_FIELDS) for name, spec in served.items()},
            "defaults": {task.value: name for task, name in self.defaults.items() if name in served},
            "refused": refused,
        }

    @classmethod
    def from_published(cls, published: Sequence[Mapping[str, Any]]) -> tuple[Registry | None, dict[str, str]]:
        """The union of what live workers publish (`published`; the first worker's entry wins a name they
        share): the registry they serve together (None if none serves anything) and the models refused by
        every worker that names them, with a reason."""
        models: dict[str, Any] = {}
        defaults: dict[str, str] = {}
        refused: dict[str, str] = {}
        for entry in published:
            for name, spec in (entry.get("models") or {}).items():
                models.setdefault(name, spec)
            for task, name in (entry.get("defaults") or {}).items():
                defaults.setdefault(task, name)
            for name, reason in (entry.get("refused") or {}).items():
                refused.setdefault(name, str(reason))
        refused = {name: reason for name, reason in refused.items() if name not in models}
        if not models:
            return None, refused
        return cls.model_validate({"models": models, "defaults": defaults}), refused

    def _check_request(self, spec: ModelSpec, request: TaskRequest) -> None:
        if isinstance(request, TranslateRequest) and not spec.serves_pair(request.source_lang, request.target_lang):
            raise UnsupportedLanguagePair(
                f"model {spec.name!r} does not translate {request.source_lang or '*'} -> "
                f"{request.target_lang or '*'}; it serves {spec.languages}"
            )
        if isinstance(request, QARequest) and request.mode is not None and request.mode != spec.mode:
            raise ModelNotFound(f"model {spec.name!r} does {spec.mode} QA, not {request.mode}")
