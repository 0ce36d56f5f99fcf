"""Inference with a KV cache: `prefill`, `decode_step`, `generate`, `sample_tokens`.

All take the `CausalLM` module, split it once per call with `nnx.split`, and run plain `jax.jit` functions that
`nnx.merge` inside. Shapes are static: a prefill compiles once per (batch, prompt length, cache length), a decode
step once per (batch, cache length), and `generate` (prefill plus a `lax.while_loop` of decode steps) once per
(batch, prompt length, max_new_tokens) and sampling settings.

Batches are left-padded: `attention_mask` [B, T] is False on the padding at the start of a row (None when there is
none, which lets cuDNN attention run unmasked). RoPE positions count real tokens only, as in HF.

    prefill(model, tokens, attention_mask=None, *, max_length, return_all_logits=False) -> (logits, KVCache)
    decode_step(model, tokens, cache) -> (logits [B, V], KVCache)
    generate(model, tokens, attention_mask=None, *, max_new_tokens, temperature=0.0, top_p=1.0,
             eos_token_id=None, pad_token_id=None, rng=None) -> int32 [B, max_new_tokens]
    sample_tokens(logits, rng, *, temperature, top_p) -> int32 [B]
    TokenStream(model, tokens, attention_mask=None, *, max_new_tokens, ..., collect=())  iterates generate's tokens
                                                                                        step by step: int32 [B]

`TokenStream` is for streaming output: the same tokens as `generate` for the same arguments, one Python step per
token (the cache donated to each step), compiled ahead of time so that its timings separate compilation from work.
"""

import functools
import time
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from seer_jax.kv_cache import KVCache
from seer_jax.model import CausalLM


def prefill(
    model: CausalLM,
    tokens: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    max_length: int,
    return_all_logits: bool = False,
) -> tuple[jax.Array, KVCache]:
    """Runs the prompt and returns a cache with `max_length` slots for decoding.

    Args:
      model: the LM.
      tokens: int [B, T] left-padded prompts.
      attention_mask: bool [B, T], or None without padding.
      max_length: S, cache slots (>= T): prompt plus the tokens to decode.
      return_all_logits: return logits [B, T, V] for every position instead of [B, V] for the last one.
    """
    graphdef, state = nnx.split(model)
    return _prefill_jit(
        graphdef, state, tokens, attention_mask, max_length=max_length, return_all_logits=return_all_logits
    )


def decode_step(model: CausalLM, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Feeds one token per row (int [B]) at slot `cache.length`; returns logits [B, V] and the updated cache.

    The cache is not donated, so each call copies it; `generate` decodes inside one compiled loop instead.
    """
    graphdef, state = nnx.split(model)
    return _decode_jit(graphdef, state, tokens, cache)


def generate(
    model: CausalLM,
    tokens: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    rng: jax.Array | None = None,
) -> jax.Array:
    """Continues each prompt by up to `max_new_tokens` tokens.

    Args:
      model: the LM.
      tokens: int [B, T] left-padded prompts; attention_mask: bool [B, T], or None without padding.
      max_new_tokens: tokens to generate per row.
      temperature: 0 for greedy decoding, otherwise softmax temperature for sampling.
      top_p: nucleus sampling threshold (1.0 keeps every token); ignored when greedy.
      eos_token_id: token(s) that end a row; None uses `model.config.eos_token_ids`, () disables stopping.
      pad_token_id: written after a row's EOS; None uses the config's pad token, else the first EOS token, else 0.
      rng: a `jax.random.key`; required when temperature > 0.

    Returns:
      int32 [B, max_new_tokens]: the generated tokens; after a row emits an EOS token, `pad_token_id`. Generation
      stops early once every row has finished; the remaining columns hold `pad_token_id`.
    """
    eos_ids, pad_token_id = _check_sampling(model, max_new_tokens, temperature, top_p, rng, eos_token_id, pad_token_id)
    graphdef, state = nnx.split(model)
    return _generate_jit(
        graphdef,
        state,
        tokens,
        attention_mask,
        jax.random.key(0) if rng is None else rng,
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        eos_ids=eos_ids,
        pad_token_id=int(pad_token_id),
    )


class TokenStream:
    """`generate`, one decode step per `next()`: yields int32 [B], the tokens `generate` returns column by column for
    the same arguments, and stops after `max_new_tokens` steps or once every row has emitted an EOS token (a
    finished row yields `pad_token_id`).

    Construction compiles the prefill and the decode step ahead of time (`compile_seconds`; a later stream of the
    same shapes and settings reuses them). The first `next()` runs the prefill and samples the first token; each
    later one feeds the previous token and donates the cache to the step. Arguments as `generate`'s, plus
    `collect`: names of per-layer values the prefill returns besides its logits (`CausalLM.forward`; "density"
    for a `seer_jax.seer.SeerCausalLM`), in `collected` after the first step.
    """

    def __init__(
        self,
        model: CausalLM,
        tokens: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        rng: jax.Array | None = None,
        collect: Sequence[str] = (),
    ):
        eos_ids, pad_token_id = _check_sampling(
            model, max_new_tokens, temperature, top_p, rng, eos_token_id, pad_token_id
        )
        self.max_new_tokens = max_new_tokens
        self.collected: tuple[Mapping[str, jax.Array], ...] = ()
        self._tokens, self._attention_mask = jnp.asarray(tokens), attention_mask
        self._rng = jax.random.key(0) if rng is None else rng
        self._step = 0
        self._token = self._done = self._cache = None
        graphdef, self._state = nnx.split(model)
        sampling = dict(temperature=float(temperature), top_p=float(top_p), eos_ids=eos_ids)
        start = time.perf_counter()
        # The last generated token is never fed back, so the cache needs max_new_tokens - 1 free slots.
        max_length = self._tokens.shape[1] + max_new_tokens - 1
        prefill = _stream_prefill_jit.lower(
            graphdef,
            self._state,
            self._tokens,
            attention_mask,
            self._rng,
            max_length=max_length,
            collect=tuple(sorted(collect)),
            **sampling,
        )
        token, done, cache, rng, _ = prefill.out_info
        self._prefill = prefill.compile()
        self._decode = _stream_decode_jit.lower(
            graphdef, self._state, token, done, cache, rng, pad_token_id=int(pad_token_id), **sampling
        ).compile()
        self.compile_seconds = time.perf_counter() - start

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> jax.Array:
        if self._step == 0:
            self._token, self._done, self._cache, self._rng, self.collected = self._prefill(
                self._state, self._tokens, self._attention_mask, self._rng
            )
        elif self._step >= self.max_new_tokens or bool(jnp.all(self._done)):
            raise StopIteration
        else:
            self._token, self._done, self._cache, self._rng = self._decode(
                self._state, self._token, self._done, self._cache, self._rng
            )
        self._step += 1
        return self._token


def sample_tokens(logits: jax.Array, rng: jax.Array, *, temperature: float, top_p: float) -> jax.Array:
    """logits [B, V] → int32 [B]: argmax when temperature == 0, else a temperature / nucleus (top-p) sample.

    Nucleus: keep the most probable tokens whose preceding cumulative probability is below `top_p` (the top token
    always survives), as HF's `TopPLogitsWarper`.
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1:
        order = jnp.argsort(-logits, axis=-1)  # [B, V]
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)  # [B, V]
        sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
        preceding = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # [B, V]
        sorted_logits = jnp.where(preceding < top_p, sorted_logits, -jnp.inf)
        logits = jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _check_sampling(
    model: CausalLM,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    rng: jax.Array | None,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int | None,
) -> tuple[tuple[int, ...], int]:
    """Validates `generate`'s settings; returns (EOS ids, pad id) with the defaults its docstring gives."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature={temperature}, top_p={top_p}")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs rng=jax.random.key(seed)")
    config = model.config
    if eos_token_id is None:
        eos_ids = config.eos_token_ids
    else:
        eos_ids = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
    if pad_token_id is None:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    return eos_ids, int(pad_token_id)


def _prefill(
    model: CausalLM,
    tokens: jax.Array,
    attention_mask: jax.Array | None,
    *,
    max_length: int,
    return_all_logits: bool,
    collect: tuple[str, ...] = (),
) -> tuple[jax.Array, KVCache, tuple[Mapping[str, jax.Array], ...]]:
    if max_length < tokens.shape[1]:
        raise ValueError(f"max_length ({max_length}) must be at least the prompt length ({tokens.shape[1]})")
    logits, cache, collected = model.forward(
        tokens, attention_mask=attention_mask, last_only=not return_all_logits, collect=collect
    )
    logits = logits if return_all_logits else logits[:, -1]  # [B, T, V] or [B, V]
    return logits, cache.padded_to(max_length), collected


def _decode(model: CausalLM, tokens: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    logits, cache = model(tokens[:, None], cache=cache)  # [B, 1, V]
    return logits[:, 0], cache


@functools.partial(jax.jit, static_argnums=0, static_argnames=("max_length", "return_all_logits"))
def _prefill_jit(graphdef, state, tokens, attention_mask, *, max_length, return_all_logits):
    model = nnx.merge(graphdef, state)
    return _prefill(model, tokens, attention_mask, max_length=max_length, return_all_logits=return_all_logits)[:2]


@functools.partial(jax.jit, static_argnums=0)
def _decode_jit(graphdef, state, tokens, cache):
    return _decode(nnx.merge(graphdef, state), tokens, cache)


@functools.partial(
    jax.jit,
    static_argnums=0,
    static_argnames=("max_new_tokens", "temperature", "top_p", "eos_ids", "pad_token_id"),
)
def _generate_jit(
    graphdef, state, tokens, attention_mask, rng, *, max_new_tokens, temperature, top_p, eos_ids, pad_token_id
):
    model = nnx.merge(graphdef, state)
    batch, prompt_length = tokens.shape
    sample = functools.partial(sample_tokens, temperature=temperature, top_p=top_p)
    eos = jnp.asarray(eos_ids, jnp.int32)  # [number of EOS tokens]

    # The last generated token is never fed back, so the cache needs max_new_tokens - 1 free slots.
    logits, cache, _ = _prefill(
        model, tokens, attention_mask, max_length=prompt_length + max_new_tokens - 1, return_all_logits=False
    )
    rng, step_rng = jax.random.split(rng)
    token = sample(logits, step_rng)  # [B]
    done = jnp.isin(token, eos)  # [B]
    generated = jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(token)

    def unfinished(carry):
        step, _, _, _, done, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def step_once(carry):
        step, generated, token, cache, done, rng = carry
        logits, cache = _decode(model, token, cache)
        rng, step_rng = jax.random.split(rng)
        token = jnp.where(done, pad_token_id, sample(logits, step_rng))  # [B]
        generated = jax.lax.dynamic_update_slice(generated, token[:, None], (0, step))
        return step + 1, generated, token, cache, done | jnp.isin(token, eos), rng

    carry = (jnp.asarray(1, jnp.int32), generated, token, cache, done, rng)
    return jax.lax.while_loop(unfinished, step_once, carry)[1]


@functools.partial(
    jax.jit, static_argnums=0, static_argnames=("max_length", "collect", "temperature", "top_p", "eos_ids")
)
def _stream_prefill_jit(
    graphdef, state, tokens, attention_mask, rng, *, max_length, collect, temperature, top_p, eos_ids
):
    model = nnx.merge(graphdef, state)
    logits, cache, collected = _prefill(
        model, tokens, attention_mask, max_length=max_length, return_all_logits=False, collect=collect
    )
    rng, step_rng = jax.random.split(rng)
    token = sample_tokens(logits, step_rng, temperature=temperature, top_p=top_p)  # [B]
    return token, jnp.isin(token, jnp.asarray(eos_ids, jnp.int32)), cache, rng, collected


@functools.partial(
    jax.jit,
    static_argnums=0,
    static_argnames=("temperature", "top_p", "eos_ids", "pad_token_id"),
    donate_argnames=("cache",),
)
def _stream_decode_jit(graphdef, state, token, done, cache, rng, *, temperature, top_p, eos_ids, pad_token_id):
    logits, cache = _decode(nnx.merge(graphdef, state), token, cache)
    rng, step_rng = jax.random.split(rng)
    token = jnp.where(done, pad_token_id, sample_tokens(logits, step_rng, temperature=temperature, top_p=top_p))
    return token, done | jnp.isin(token, jnp.asarray(eos_ids, jnp.int32)), cache, rng
