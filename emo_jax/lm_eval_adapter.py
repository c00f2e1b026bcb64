"""lm-evaluation-harness for emo_jax models: the scoring core and the harness model `emo_jax`.

`Scorer` answers the harness's three request types with the model's one forward (full model, or
a subset of its experts by masking) and needs nothing of the harness, so it is usable and tested
without it:

* `loglikelihood([(context, continuation), ...])` -> [(sum of log p(continuation tokens |
  context), whether every continuation token is the argmax)]: the log-softmax of the logits the
  forward returns, through `emo_jax.model.cross_entropy` (the one home of that math).
* `loglikelihood_rolling([text, ...])` -> [log p(text)]: every token of the document scored
  once, after a prefix token (eos, as the harness does), in windows of at most `seq_len` scored
  tokens, each window with as much preceding context as `seq_len` allows.
* `generate_until([(context, gen_kwargs), ...])` -> [text]: greedy decoding with the KV cache
  (`emo_jax.model.decode.Decoder`, the prefill and step `decode.generate` runs), stopping at
  eos, at the first of `gen_kwargs['until']` (cut off from the answer) or after
  `max_gen_toks` tokens.

Contexts longer than the model's `seq_len` are left-truncated. Scoring packs the requests into
rows of a fixed width (each request its own segment, positions from 0, so it is seen exactly
as alone: attention stays within a segment and routing is per token, dropless on one device)
and runs `batch_size` rows at a time: the width is the power of two (>= 64, <= seq_len) that
holds the longest request of a call, so a whole evaluation compiles the forward a handful of
times. The forward holds batch_size x width x vocabulary float32 logits: lower batch_size for
a large vocabulary. Decoding batches the requests that share a prompt length (a cache has no
padding) and compiles once per prompt length. Sampling options in gen_kwargs are ignored:
decoding is greedy.

With the harness installed (`pip install -e '.[lm_eval]'`), importing this module registers
the harness model `emo_jax` (`EmoJaxLM`; model_args `checkpoint=DIR[,subset=FILE][,step=N]
[,seq_len=N][,max_gen_toks=N]`). The harness finds models only by import, so its own
`lm_eval` command does not know `emo_jax`; `python -m emo_jax.lm_eval` (emo_jax/lm_eval.py)
imports this module and runs the harness's command line.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emo_jax.model import cross_entropy, decode
from emo_jax.modular.runtime import prompt_ids

try:  # the harness is an optional extra
    from lm_eval.api.model import LM as _HarnessLM
    from lm_eval.api.registry import register_model as _register_model
except ImportError:
    _HarnessLM = None

INSTALL_HINT = "lm-evaluation-harness is not installed: pip install -e '.[lm_eval]'"
MIN_WIDTH = 64  # the narrowest packed row
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256

_log = logging.getLogger(__name__)

# Compiled scoring forwards by model config (models of one config share a graph structure).
_COMPILED = {}


def harness_available() -> bool:
    return _HarnessLM is not None


def _score_fn(model):
    """jitted (state, tokens, segment_ids, positions, targets, mask) -> (log p(target) [B, W]
    float32, target is the argmax [B, W] bool), from the model's forward."""
    key = model.config
    if key not in _COMPILED:
        graphdef, _ = nnx.split(model)

        @jax.jit
        def score(state, tokens_BW, segment_ids_BW, positions_BW, targets_BW, mask_LR):
            out = nnx.merge(graphdef, state)(tokens_BW, segment_ids_BW, positions_BW,
                                             expert_mask_LR=mask_LR)
            loss_BW, _ = cross_entropy.token_cross_entropy(out.logits_BSV, targets_BW)
            return -loss_BW, jnp.argmax(out.logits_BSV, axis=-1) == targets_BW

        _COMPILED[key] = score
    return _COMPILED[key]


def row_width(n: int, seq_len: int) -> int:
    """The power of two >= n (at least MIN_WIDTH), at most seq_len."""
    width = MIN_WIDTH
    while width < n:
        width *= 2
    return min(width, seq_len)


def _stop_list(until) -> list[str]:
    if until is None:
        return []
    if isinstance(until, str):
        return [until]
    if not isinstance(until, (list, tuple)) or not all(isinstance(s, str) for s in until):
        raise ValueError(f"gen_kwargs 'until' must be a string or a list of strings, "
                         f"not {until!r}")
    return [s for s in until if s]


def cut_at_stop(text: str, until: list[str]) -> str:
    """`text` up to the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in until:
        at = text.find(stop)
        if at >= 0:
            cut = min(cut, at)
    return text[:cut]


class Scorer:
    """The harness's requests answered by one model (module docstring)."""

    def __init__(self, model, tokenizer, *, seq_len: int, expert_mask_LR=None,
                 batch_size: int = DEFAULT_BATCH_SIZE,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, boundary: str = "eos_closes"):
        """boundary: the model's `data.boundary`; 'eos_opens' (documents started with eos in
        training) puts eos before every context."""
        if int(seq_len) < 2:
            raise ValueError(f"seq_len is {seq_len}; it must be >= 2")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size is {batch_size}; it must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.seq_len, self.batch_size = int(seq_len), int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.mask = None if expert_mask_LR is None else jnp.asarray(expert_mask_LR, bool)
        self.prefix_id = int(tokenizer.eos_id)
        self.boundary = boundary
        self.opens_with_eos = boundary == "eos_opens"
        self._state = nnx.state(model)
        self._score = _score_fn(model)
        self._decoder = None
        self.shapes = set()  # (rows, width) of every scoring batch run; (rows, prompt) decoded

    @classmethod
    def from_checkpoint(cls, checkpoint: str, *, subset: str | None = None,
                        step: int | None = None, seq_len: int | None = None, **kwargs):
        """A Scorer of a training workdir or model directory, optionally masked to a subset
        file's experts (refused when the subset was chosen for another model)."""
        from emo_jax.modular import runtime, subset as subset_lib

        model, config, _ = runtime.load_model(checkpoint, step=step)
        mask = None
        if subset:
            chosen = subset_lib.load(subset)
            chosen.check_model(config, model, where=f"the subset {subset}")
            mask = chosen.mask()
        kwargs.setdefault("boundary", config.data.boundary)
        return cls(model, runtime.tokenizer_of(config), seq_len=seq_len or config.data.seq_len,
                   expert_mask_LR=mask, **kwargs)

    # --- log-likelihoods -----------------------------------------------------------------

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of (context, continuation) as the harness splits them: spaces ending the
        context go to the continuation, and the continuation is what encoding the whole text
        adds after the context's ids."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = list(self.tokenizer.encode(context + continuation))
        ctx = list(self.tokenizer.encode(context)) if context else []
        opening = [self.prefix_id] if self.opens_with_eos else []
        if whole[:len(ctx)] != ctx:  # a tokenizer that merges across the boundary
            return opening + ctx, list(self.tokenizer.encode(continuation))
        return opening + ctx, whole[len(ctx):]

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """[(log p(continuation | context), greedy)] of (context, continuation) text pairs."""
        return self.loglikelihood_tokens([self.encode_pair(c, x) for c, x in requests])

    def loglikelihood_rolling(self, texts) -> list[float]:
        """[log p(text)] of whole documents (module docstring)."""
        pairs = [([self.prefix_id], list(self.tokenizer.encode(t))) for t in texts]
        return [lp for lp, _ in self.loglikelihood_tokens(pairs)]

    def _windows(self, context: list[int], continuation: list[int]):
        """(inputs, targets, scored) per window: at most seq_len inputs, the last `scored`
        targets being continuation tokens, each continuation token scored in one window."""
        context = list(context) or [self.prefix_id]
        tokens, n = context + list(continuation), len(context)
        for start in range(0, len(continuation), self.seq_len):
            end = n + min(start + self.seq_len, len(continuation))
            window = tokens[max(0, end - self.seq_len - 1):end]
            yield window[:-1], window[1:], end - (n + start)

    def loglikelihood_tokens(self, requests) -> list[tuple[float, bool]]:
        """[(sum of log p, all greedy)] of the continuation ids after the context ids of each
        (context ids, continuation ids); an empty context is the prefix token; an empty
        continuation scores (0.0, True)."""
        windows = []  # (request, inputs, targets, scored)
        for i, (ctx, cont) in enumerate(requests):
            windows += [(i, *w) for w in self._windows(ctx, cont)]
        totals = np.zeros(len(requests), np.float64)
        greedy = np.ones(len(requests), bool)
        if not windows:
            return [(0.0, True) for _ in requests]
        width = row_width(max(len(w[1]) for w in windows), self.seq_len)
        order = sorted(range(len(windows)), key=lambda j: -len(windows[j][1]))
        placed, fill = [], [0] * self.batch_size
        for j in order:  # first fit, longest first, into batch_size rows of `width`
            n = len(windows[j][1])
            row = next((r for r in range(self.batch_size) if fill[r] + n <= width), None)
            if row is None:
                self._run(windows, placed, width, totals, greedy)
                placed, fill, row = [], [0] * self.batch_size, 0
            placed.append((j, row, fill[row]))
            fill[row] += n
        self._run(windows, placed, width, totals, greedy)
        return [(float(t), bool(g)) for t, g in zip(totals, greedy)]

    def _run(self, windows, placed, width, totals, greedy):
        shape = (self.batch_size, width)
        tokens, segments, positions, targets = (np.zeros(shape, np.int32) for _ in range(4))
        segment_of_row = [0] * self.batch_size
        for j, row, at in placed:
            _, inputs, target, _ = windows[j]
            n = len(inputs)
            segment_of_row[row] += 1
            tokens[row, at:at + n], targets[row, at:at + n] = inputs, target
            segments[row, at:at + n] = segment_of_row[row]
            positions[row, at:at + n] = np.arange(n)
        self.shapes.add(shape)
        logp, top = self._score(self._state, tokens, segments, positions, targets, self.mask)
        logp, top = np.asarray(logp, np.float64), np.asarray(top)
        for j, row, at in placed:
            i, inputs, _, scored = windows[j]
            end = at + len(inputs)
            totals[i] += logp[row, end - scored:end].sum()
            greedy[i] &= bool(top[row, end - scored:end].all())

    # --- generation ----------------------------------------------------------------------

    def generate_until(self, requests) -> list[str]:
        """[continuation text] of (context, gen_kwargs) pairs, greedy (module docstring)."""
        jobs = {}  # (prompt length, max new tokens) -> [(request, prompt ids, stop strings)]
        for i, (context, gen_kwargs) in enumerate(requests):
            kwargs = dict(gen_kwargs or {})
            until = _stop_list(kwargs.pop("until", None))
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            max_new = max(1, min(max_new, self.seq_len - 1))
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0) or 0) > 0:
                _log.warning("emo_jax decodes greedily; sampling options %s ignored", kwargs)
            prompt = prompt_ids(self.tokenizer, context, self.boundary) or [self.prefix_id]
            prompt = prompt[-(self.seq_len - max_new):]
            jobs.setdefault((len(prompt), max_new), []).append((i, prompt, until))
        out = [""] * len(requests)
        for (_, max_new), group in sorted(jobs.items()):
            for start in range(0, len(group), self.batch_size):
                chunk = group[start:start + self.batch_size]
                texts = self._greedy([p for _, p, _ in chunk], max_new, [u for *_, u in chunk])
                for (i, _, _), text in zip(chunk, texts):
                    out[i] = text
        return out

    def _greedy(self, prompts, max_new: int, untils) -> list[str]:
        """Greedy continuations of equal-length prompts, each stopped at eos or at its first
        stop string (cut off), or after max_new tokens."""
        if self._decoder is None:
            self._decoder = decode.Decoder(self.model, temperature=0.0)
        dec, eos = self._decoder, self.tokenizer.eos_id
        prompt_BP = jnp.asarray(np.asarray(prompts, np.int32))
        b, p = prompt_BP.shape
        self.shapes.add((b, p))
        cache = decode.init_cache(self.model.config, b, p + max_new)
        key = jax.random.key(0)  # unused by greedy decoding
        token_B, _, cache, _ = dec.prefill(dec.state, prompt_BP, cache, self.mask, key)
        ids = [[] for _ in range(b)]
        done = np.zeros(b, bool)
        for i in range(max_new):
            for r, t in enumerate(np.asarray(token_B).tolist()):
                if done[r]:
                    continue
                if t == eos:
                    done[r] = True
                    continue
                ids[r].append(t)
                if untils[r] and any(s in self.tokenizer.decode(ids[r]) for s in untils[r]):
                    done[r] = True
            if done.all() or i == max_new - 1:
                break
            token_B, _, cache, _ = dec.step(dec.state, token_B, p + i, cache, self.mask, key)
        return [cut_at_stop(self.tokenizer.decode(r_ids), u) for r_ids, u in zip(ids, untils)]


# --- the harness model -------------------------------------------------------------------

_PRELOADED = {}  # (checkpoint, subset, step, seq_len) -> Scorer: loaded by the command line


def preload(checkpoint: str, *, subset=None, step=None, seq_len=None, **kwargs) -> Scorer:
    """Load a Scorer now (errors surface here, as one line in the command line) and let
    `EmoJaxLM(checkpoint=..., ...)` with the same arguments take it."""
    scorer = Scorer.from_checkpoint(checkpoint, subset=subset, step=step, seq_len=seq_len,
                                    **kwargs)
    _PRELOADED[(str(checkpoint), subset or None, step, seq_len)] = scorer
    return scorer


def _int_or_none(value):
    return None if value in (None, "") or str(value).startswith("auto") else int(value)


if _HarnessLM is not None:

    @_register_model("emo_jax")
    class EmoJaxLM(_HarnessLM):
        """The harness model `emo_jax` (module docstring): `EmoJaxLM(checkpoint=DIR,
        subset=FILE)`, or `EmoJaxLM(scorer=Scorer(model, tokenizer, ...))` for a model in
        memory. batch_size: rows of one forward ('auto' or none: 8)."""

        def __init__(self, checkpoint=None, subset=None, step=None, seq_len=None,
                     batch_size=None, max_gen_toks=DEFAULT_MAX_GEN_TOKS, scorer=None,
                     **unused):
            super().__init__()
            unused = {k: v for k, v in unused.items()
                      if k not in ("device", "max_batch_size") and v is not None}
            if unused:
                raise ValueError(f"emo_jax model_args: unknown {sorted(unused)}; known: "
                                 "checkpoint, subset, step, seq_len, batch_size, max_gen_toks")
            if scorer is None:
                if not checkpoint:
                    raise ValueError("emo_jax needs model_args checkpoint=DIR")
                step, seq_len = _int_or_none(step), _int_or_none(seq_len)
                scorer = _PRELOADED.get((str(checkpoint), subset or None, step, seq_len))
                if scorer is None:
                    scorer = Scorer.from_checkpoint(checkpoint, subset=subset or None, step=step,
                                                    seq_len=seq_len)
            scorer.batch_size = _int_or_none(batch_size) or scorer.batch_size
            scorer.max_gen_toks = int(max_gen_toks)
            self.scorer = scorer

        @property
        def max_length(self) -> int:
            return self.scorer.seq_len

        @property
        def tokenizer_name(self) -> str:
            return str(getattr(self.scorer.tokenizer, "spec", "emo_jax"))

        def _answer(self, kind, requests, results):
            for request, result in zip(requests, results):
                self.cache_hook.add_partial(kind, request.args, result)
            return results

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self._answer("loglikelihood", requests,
                                self.scorer.loglikelihood([r.args for r in requests]))

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self._answer("loglikelihood_rolling", requests,
                                self.scorer.loglikelihood_rolling([r.args[0] for r in requests]))

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self._answer("generate_until", requests,
                                self.scorer.generate_until([r.args for r in requests]))
