"""Synthetic data with known structure: click logs from a hidden ground-truth model, and
long-tail token sequences for language models (with a copy/reverse task).

Both are deterministic functions of their arguments and `seed`. The CTR generator's hidden
model depends only on `seed` and the feature layout, never on `num_samples`, so samples
drawn with one seed (e.g. a train and a test split of one call) share the same truth.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from luoshu.data.errors import DataError

# 26 slot sizes spread geometrically from 4 to 100,000, as Criteo's columns range from a
# handful of values to millions.
DEFAULT_SLOT_SIZES = tuple(int(v) for v in np.geomspace(4, 100_000, 26).round())


def _power_law_cdf(size: int, alpha: float) -> np.ndarray:
    weights = np.arange(1, size + 1, dtype=np.float64) ** -alpha
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def _draw_power_law(rng: np.random.Generator, size: int, n: int, alpha: float) -> np.ndarray:
    """n draws from [0, size) with P(k) ∝ (k + 1)^-alpha: exact up to 2^20 values, beyond that
    (Criteo-sized columns) from the continuous bounded power law, floored."""
    u = rng.random(n)
    if size <= 1 << 20:
        return np.minimum(np.searchsorted(_power_law_cdf(size, alpha), u, side="right"), size - 1).astype(np.int64)
    # id k covers [k + 0.5, k + 1.5) of the continuous law x^-alpha on [0.5, size + 0.5)
    lo, hi = 0.5, size + 0.5
    if alpha == 1:
        x = lo * np.exp(u * np.log(hi / lo))
    else:
        x = (lo ** (1 - alpha) + u * (hi ** (1 - alpha) - lo ** (1 - alpha))) ** (1 / (1 - alpha))
    return np.clip(np.floor(x - 0.5), 0, size - 1).astype(np.int64)


def _draw_ids(rng: np.random.Generator, size: int, n: int, dist: str, alpha: float) -> np.ndarray:
    if dist == "uniform":
        return rng.integers(0, size, n, dtype=np.int64)
    return _draw_power_law(rng, size, n, alpha)  # small ids are the hot ones


def _hash_normal(keys: np.ndarray, salt: int) -> np.ndarray:
    """Standard normal values that are a fixed function of (key, salt): SplitMix64 hashes give
    two uniforms, Box-Muller turns them into a normal. Lets the hidden model give every id of an
    arbitrarily large slot its own weight without storing a table."""
    def mix(z):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    base = keys.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(salt)
    u1 = (mix(base) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    u2 = (mix(base ^ np.uint64(0xD1B54A32D192ED03)) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return np.sqrt(-2 * np.log1p(-u1)) * np.cos(2 * np.pi * u2)


class _HiddenCTRModel:
    """The ground truth: logit = bias + dense weights · centred log counts + per-id weights +
    factorisation-machine interactions of per-id embeddings (then scaled to a set spread).
    Per-id values are hashed from (seed, slot, id, dimension), so any slot size costs no memory."""

    def __init__(self, rng: np.random.Generator, dense_dim: int, num_slots: int, embed_dim: int,
                 interaction_weight: float):
        self.interaction_weight = interaction_weight
        self.dense_rate = np.exp(rng.normal(1.0, 1.0, dense_dim))  # mean count of each dense feature
        self.dense_weight = rng.normal(0, 1, dense_dim) / np.sqrt(max(dense_dim, 1))
        self.salts = rng.integers(0, 2**63, (num_slots, embed_dim + 1), dtype=np.int64)
        self.id_scale = 1 / np.sqrt(max(num_slots, 1))
        self.embed_scale = 1 / np.sqrt(max(embed_dim, 1))
        self.embed_dim = embed_dim

    def dense(self, rng: np.random.Generator, n: int) -> np.ndarray:
        # over-dispersed counts (Poisson with a Gamma-distributed rate), like Criteo's integer features
        return rng.poisson(self.dense_rate * rng.gamma(1.0, 1.0, (n, len(self.dense_rate)))).astype(np.float64)

    def raw_logit(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        z = np.nan_to_num(np.log1p(dense) - np.log1p(self.dense_rate))
        logit = z @ self.dense_weight
        pooled = np.zeros((len(sparse), self.embed_dim))
        squares = np.zeros(len(sparse))
        for s, salts in enumerate(self.salts):
            ids = sparse[:, s]
            present = ids >= 0
            safe = np.where(present, ids, 0)
            logit += np.where(present, _hash_normal(safe, int(salts[0])) * self.id_scale, 0.0)
            e = np.stack([_hash_normal(safe, int(salt)) for salt in salts[1:]], axis=1) * self.embed_scale
            e *= present[:, None]
            pooled += e
            squares += (e * e).sum(axis=1)
        # sum over slot pairs of <e_i, e_j>; dividing by sqrt(pairs / embed_dim) gives it unit
        # variance, like the linear parts, so no one part drowns the others
        pairs = max(len(self.salts) * (len(self.salts) - 1) / 2, 1)
        interactions = 0.5 * ((pooled * pooled).sum(axis=1) - squares) / np.sqrt(pairs / max(self.embed_dim, 1))
        return logit + self.interaction_weight * interactions


def synthetic_ctr(num_samples: int, dense_dim: int = 13, slot_sizes: Sequence[int] = DEFAULT_SLOT_SIZES,
                  dist: str = "uniform", alpha: float = 1.2, seed: int = 0, embed_dim: int = 4,
                  interaction_weight: float = 0.5, logit_scale: float = 2.0, ctr: float = 0.25,
                  missing_rate: float = 0.0,
                  return_probability: bool = False, sample_index: int | None = None) -> dict[str, np.ndarray]:
    """Click-log samples whose labels follow a hidden model, so a good CTR model can learn them.

    Returns a CTR batch: `"dense"` float32 (N, dense_dim) of non-negative integer counts,
    `"sparse"` int64 (N, len(slot_sizes)) with ids in [0, slot_size) (uniform, or power law
    with exponent `alpha`, id 0 the hottest; any size, even 2^40, costs no memory),
    `"label"` float32 0/1 drawn as Bernoulli of the true click probability (also returned as
    `"probability"` with `return_probability`).
    The hidden logit sums a dense part, a per-id part and, weighted by `interaction_weight`,
    factorisation-machine interactions of per-id `embed_dim` embeddings (each part of about
    unit variance), so a linear model learns much of it and an FM/DLRM more. The true
    logits have standard deviation about `logit_scale` and the mean click rate is
    near `ctr`. With `missing_rate` > 0 that fraction of values is missing (dense NaN, sparse
    -1) and contributes nothing. Write the result with `write_criteo` (13 dense, 26 sparse
    columns) or `write_ctr_parquet`.
    """
    if dist not in ("uniform", "power_law"):
        raise DataError(f"synthetic_ctr dist must be 'uniform' or 'power_law'; got {dist!r}")
    if num_samples < 0 or any(s < 1 for s in slot_sizes) or not 0 < ctr < 1 or not 0 <= missing_rate < 1:
        raise DataError(f"synthetic_ctr needs num_samples >= 0, slot sizes >= 1, 0 < ctr < 1 and "
                        f"0 <= missing_rate < 1; got {num_samples}, {list(slot_sizes)}, {ctr}, {missing_rate}")
    model_seed, calibration_seed, sample_seed = np.random.SeedSequence(seed).spawn(3)
    model = _HiddenCTRModel(np.random.default_rng(model_seed), dense_dim, len(slot_sizes), embed_dim,
                            interaction_weight)

    def draw(rng, n):
        dense = model.dense(rng, n)
        sparse = np.stack([_draw_ids(rng, size, n, dist, alpha) for size in slot_sizes], axis=1) \
            if len(slot_sizes) else np.zeros((n, 0), np.int64)
        if missing_rate:
            dense[rng.random(dense.shape) < missing_rate] = np.nan
            sparse[rng.random(sparse.shape) < missing_rate] = -1
        return dense, sparse

    # Calibrate the logit scale and shift on an independent sample, so they do not depend on num_samples.
    calibration = model.raw_logit(*draw(np.random.default_rng(calibration_seed), 8192))
    mean, std = calibration.mean(), calibration.std() or 1.0
    calibration = (calibration - mean) / std * logit_scale
    low, high = -30.0, 30.0  # bisect for the bias that makes the mean click probability `ctr`
    for _ in range(60):
        bias = (low + high) / 2
        low, high = (bias, high) if np.mean(1 / (1 + np.exp(-(calibration + bias)))) < ctr else (low, bias)
    # `sample_index` draws another sample (e.g. one per file) from the same hidden model
    rng = np.random.default_rng(sample_seed if sample_index is None else np.random.SeedSequence([seed, sample_index]))
    dense, sparse = draw(rng, num_samples)
    logit = (model.raw_logit(dense, sparse) - mean) / std * logit_scale + bias
    probability = 1 / (1 + np.exp(-logit))
    out = {"dense": dense.astype(np.float32), "sparse": sparse.astype(np.int64),
           "label": (rng.random(num_samples) < probability).astype(np.float32)}
    if return_probability:
        out["probability"] = probability.astype(np.float32)
    return out


def _lengths(rng: np.random.Generator, num: int, min_len: int, max_len: int, dist: str, alpha: float) -> np.ndarray:
    if dist == "uniform":
        return rng.integers(min_len, max_len + 1, num)
    if dist == "long_tail":  # discrete power law P(L) ∝ L^-alpha on [min_len, max_len]
        support = np.arange(min_len, max_len + 1)
        cdf = np.cumsum(support.astype(np.float64) ** -alpha)
        return support[np.minimum(np.searchsorted(cdf / cdf[-1], rng.random(num), side="right"), len(support) - 1)]
    if dist == "lognormal":  # median at the geometric mean of the bounds, clipped
        mu = 0.5 * (np.log(min_len) + np.log(max_len))
        sigma = max((np.log(max_len) - np.log(min_len)) / 4, 1e-6)
        return np.clip(np.rint(rng.lognormal(mu, sigma, num)), min_len, max_len).astype(np.int64)
    if dist in CORPUS_LENGTHS:  # tokens per document shaped like a real corpus, clipped to the bounds
        median, sigma = CORPUS_LENGTHS[dist]
        return np.clip(np.rint(rng.lognormal(np.log(median), sigma, num)), min_len, max_len).astype(np.int64)
    raise DataError(f"length dist must be 'long_tail', 'lognormal', 'uniform' or one of {sorted(CORPUS_LENGTHS)}; "
                    f"got {dist!r}")


# (median tokens, log-space spread) of document lengths, read off the length histograms that
# HotSPa (SOSP 2024, Fig. 1) shows: CommonCrawl mostly short web pages (over 80% under 4K tokens)
# with a thin tail to 32K; GitHub code files longer and with a heavier tail (about a quarter
# over 4K tokens).
CORPUS_LENGTHS = {"commoncrawl": (700.0, 1.15), "github": (1400.0, 1.45)}


def corpus_lengths(num: int, corpus: str = "commoncrawl", max_len: int = 32768, min_len: int = 16,
                   seed: int = 0) -> np.ndarray:
    """`num` sequence lengths distributed like `corpus` ("commoncrawl" or "github"), for
    simulating and benchmarking mixed-length training (HotSPa's length buckets)."""
    if corpus not in CORPUS_LENGTHS:
        raise DataError(f"corpus must be one of {sorted(CORPUS_LENGTHS)}, found {corpus!r}")
    if not 1 <= min_len <= max_len or num < 0:
        raise DataError(f"corpus_lengths needs 1 <= min_len <= max_len and num >= 0; got {min_len}, {max_len}, {num}")
    return _lengths(np.random.default_rng(seed), num, min_len, max_len, corpus, 0.0)


def synthetic_sequences(num: int, vocab: int, min_len: int = 4, max_len: int = 512, dist: str = "long_tail",
                        alpha: float = 1.5, token_dist: str = "zipf", zipf_alpha: float = 1.1,
                        num_special: int = 0, seed: int = 0) -> list[np.ndarray]:
    """A corpus of `num` int64 token sequences with long-tailed lengths in [min_len, max_len].

    Lengths follow `dist`: "long_tail" (power law with exponent `alpha`: many short sequences,
    a few very long ones, as real corpora), "commoncrawl" or "github" (shaped like those
    corpora, see `corpus_lengths`), "lognormal" or "uniform". Tokens lie in
    [num_special, vocab) (the first `num_special` ids are left for padding, BOS/EOS, ...) and
    follow Zipf's law with exponent `zipf_alpha` ("zipf") or are uniform ("uniform").
    """
    if not 1 <= min_len <= max_len or vocab <= num_special or num < 0:
        raise DataError(f"synthetic_sequences needs 1 <= min_len <= max_len, vocab > num_special and num >= 0; "
                        f"got min_len={min_len}, max_len={max_len}, vocab={vocab}, num_special={num_special}")
    if token_dist not in ("zipf", "uniform"):
        raise DataError(f"synthetic_sequences token_dist must be 'zipf' or 'uniform'; got {token_dist!r}")
    rng = np.random.default_rng(seed)
    lengths = _lengths(rng, num, min_len, max_len, dist, alpha)
    total = int(lengths.sum())
    span = vocab - num_special
    if token_dist == "zipf":
        tokens = _draw_power_law(rng, span, total, zipf_alpha)
    else:
        tokens = rng.integers(0, span, total)
    tokens = (tokens + num_special).astype(np.int64)
    return np.split(tokens, np.cumsum(lengths)[:-1]) if num else []


def pad_sequences(sequences: Sequence[np.ndarray], pad_id: int = 0, length: int | None = None,
                  dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads sequences into one (N, length) array (length: the longest, by default;
    longer sequences are cut); returns it with the (uncut) lengths."""
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    width = int(lengths.max(initial=0)) if length is None else length
    out = np.full((len(sequences), width), pad_id, dtype=dtype)
    for i, s in enumerate(sequences):
        n = min(len(s), width)
        out[i, :n] = s[:n]
    return out, lengths


def copy_task(num: int, vocab: int, min_len: int = 2, max_len: int = 32, reverse: bool = False,
              dist: str = "long_tail", alpha: float = 1.5, sep_id: int = 1, ignore_index: int = -100,
              seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Language-model pairs for copying (or reversing) a random sequence: the full sequence is
    `source, sep_id, answer`; each pair is `(inputs, targets)` = `(seq[:-1], seq[1:])` with the
    targets before the answer set to `ignore_index`, so only the answer is scored. Source
    tokens are uniform in [2, vocab) (0 is left for padding, 1 is the separator by default)."""
    sources = synthetic_sequences(num, vocab, min_len, max_len, dist, alpha, token_dist="uniform",
                                  num_special=2, seed=seed)
    pairs = []
    for src in sources:
        answer = src[::-1] if reverse else src
        seq = np.concatenate([src, [sep_id], answer]).astype(np.int64)
        targets = seq[1:].copy()
        targets[:len(src)] = ignore_index
        pairs.append((seq[:-1], targets))
    return pairs
