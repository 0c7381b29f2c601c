"""Sampling: validation messages, the sampler against references, seeded reproducibility that
holds whatever the batch, and the stop conditions end to end."""

import math
import random

import pytest
import torch

from glakeserve.penalties import PenaltyRows
from glakeserve.sampling import SamplingBatch, SamplingParams, bits_to_uniform, sample, uniform_noise

# ----- validation: every rule, its message naming the field, the value and the range --------------
BAD = [
    (dict(temperature=-0.5), r"temperature must be non-negative .* got -0.5"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(top_k=-2), r"top_k must be -1 or 0 \(disable\), or at least 1, got -2"),
    (dict(min_p=1.2), r"min_p must be in \[0, 1\], got 1.2"),
    (dict(repetition_penalty=0.0), r"repetition_penalty must be greater than zero, got 0.0"),
    (dict(presence_penalty=2.5), r"presence_penalty must be in \[-2, 2\], got 2.5"),
    (dict(frequency_penalty=-3), r"frequency_penalty must be in \[-2, 2\], got -3"),
    (dict(max_tokens=0), r"max_tokens must be at least 1, got 0"),
    (dict(min_tokens=-1), r"min_tokens must be greater than or equal to 0, got -1"),
    (dict(min_tokens=5, max_tokens=3), r"min_tokens must be less than or equal to max_tokens=3, got 5"),
    (dict(n=0), r"n must be an integer in \[1, 128\], got 0"),
    (dict(seed=-1), r"seed must be in \[0, 2\*\*63\), got -1"),
    (dict(stop=[""]), r"stop must be non-empty strings"),
    (dict(stop_token_ids=[-4]), r"stop_token_ids must be non-negative token ids"),
    (dict(logit_bias={3: 100.5}), r"logit_bias values must be numbers in \[-100, 100\], got 100.5 for token 3"),
    (dict(logit_bias={-1: 1.0}), r"logit_bias keys must be non-negative token ids, got -1"),
    (dict(logit_bias={"7": 1.0}), r"logit_bias keys must be non-negative token ids, got '7'"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_validation_messages(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


# ----- the sampler against references ---------------------------------------------------------
def batch(params, vocab, outputs=None, prompts=None, steps=None):
    n = len(params)
    rows = [i for i, p in enumerate(params) if p.uses_penalties]
    penalties = PenaltyRows.from_lists(rows, [(outputs or [[]] * n)[i] for i in rows],
                                       [(prompts or [[]] * n)[i] for i in rows], vocab) if rows else None
    return SamplingBatch(params=params, seeds=[random.getrandbits(40) for _ in range(n)],
                         steps=steps or [0] * n, penalties=penalties, banned=[[] for _ in range(n)])


def test_noise_is_a_pure_function_and_uniform():
    seeds = torch.tensor([1, 2, 1]), torch.tensor([0, 0, 0])
    u = uniform_noise(*seeds, 50_000)
    assert torch.equal(u[0], u[2]) and not torch.equal(u[0], u[1])
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert not torch.equal(uniform_noise(torch.tensor([1]), torch.tensor([1]), 10)[0], u[0, :10])


def test_noise_stays_inside_the_open_interval_and_cut_tokens_never_win():
    extreme = torch.tensor([0, 1 << 8, (1 << 32) - 1, (1 << 32) - 256], dtype=torch.int64)
    u = bits_to_uniform(extreme)
    assert bool((u > 0).all()) and bool((u < 1).all())
    assert bool(torch.isfinite(-torch.log(-torch.log(u))).all())
    # seed 4265, step 0 draws all-ones top bits for token 738 of 1,000 (found by search): a cut token there
    # must still lose, on the torch path and the Triton one
    logits = torch.full((1, 1000), float("-inf"))
    logits[0, [5, 500, 999]] = 0.0
    b = SamplingBatch(params=[SamplingParams(temperature=1.0)], seeds=[4265], steps=[0])
    assert int(sample(logits, b)[0]) in (5, 500, 999)
    from glakeserve.sampling_kernel import gumbel_argmax

    one = torch.ones(1)
    assert int(gumbel_argmax(logits, one, torch.tensor([4265]), torch.tensor([0]))[0]) in (5, 500, 999)


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().repeat(4000, 1)
    b = SamplingBatch(params=[SamplingParams(temperature=1.0)] * 4000, seeds=[random.getrandbits(40)] * 4000,
                      steps=list(range(4000)))
    freq = torch.bincount(sample(logits, b), minlength=4).float() / 4000
    # four-sigma bounds of a binomial proportion
    assert torch.all((freq - probs).abs() < 4 * torch.sqrt(probs * (1 - probs) / 4000)), freq


def test_chi_square_on_a_small_vocabulary_at_several_temperatures():
    """Gumbel-max with the hashed noise draws from softmax(logits / T): Pearson's chi-square over a
    12-token vocabulary, 6,000 draws (fresh seeds and steps), below the 0.1% critical value."""
    torch.manual_seed(random.getrandbits(31))
    logits = torch.randn(12) * 1.5
    for temp in (0.5, 1.0, 1.7):
        n = 6000
        b = SamplingBatch(params=[SamplingParams(temperature=temp)] * n,
                          seeds=[random.getrandbits(62) for _ in range(n)], steps=[random.randrange(1000)] * n)
        counts = torch.bincount(sample(logits.repeat(n, 1), b), minlength=12).double()
        expected = (logits / temp).softmax(-1).double() * n
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 31.26, (temp, chi2)  # 11 degrees of freedom, p = 0.001


def test_a_row_samples_the_same_token_whatever_its_batch():
    torch.manual_seed(random.getrandbits(31))
    logits = torch.randn(6, 300) * 2
    params = [SamplingParams(temperature=t) for t in (0.8, 1.0, 0, 1.3, 0.6, 1.0)]
    b = batch(params, 300, steps=[random.randrange(50) for _ in range(6)])
    together = sample(logits, b).tolist()
    for i in range(6):
        alone = SamplingBatch(params=[params[i]], seeds=[b.seeds[i]], steps=[b.steps[i]], banned=[[]])
        assert sample(logits[i:i + 1], alone).tolist() == [together[i]]


@pytest.mark.parametrize("splits", [1, 3, 8, None])
def test_the_triton_pass_equals_its_torch_twin(splits):
    """The kernel (Triton's interpreter on a CPU, the real thing on a GPU) against the torch version
    of the same function, on fresh random rows: greedy and sampled, a vocabulary not a multiple of
    the tile, each row in one program or split over several (a greedy row's tie across two splits
    goes to the earlier token, as torch.argmax)."""
    from glakeserve.sampling import gumbel_argmax_torch
    from glakeserve.sampling_kernel import gumbel_argmax

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(random.getrandbits(31))
    B, V = 8, 1000
    logits = torch.randn(B, V) * 3
    temps = torch.tensor([0.0, 1.0, 0.7, 2.0, 1.0, 0.0, 0.3, 1.1])
    seeds = torch.tensor([random.getrandbits(62) for _ in range(B)])
    steps = torch.tensor([random.randrange(100_000) for _ in range(B)])
    tie = random.sample(range(V), 2)
    logits[0, tie] = 50.0
    want = gumbel_argmax_torch(logits, temps, seeds, steps)
    got = gumbel_argmax(logits.to(dev), temps.to(dev), seeds.to(dev), steps.to(dev), block=64,
                        splits=splits).cpu()
    assert int(got[0]) == min(tie)
    assert torch.equal(got, want)
    assert torch.equal(want[temps == 0], logits[temps == 0].argmax(-1))


def test_top_k_top_p_min_p_cut_the_tail():
    torch.manual_seed(random.getrandbits(31))
    logits = torch.randn(3, 100) * 3
    params = [SamplingParams(temperature=1.0, top_k=5), SamplingParams(temperature=1.0, top_p=0.6),
              SamplingParams(temperature=1.0, min_p=0.2)]
    probs = logits.softmax(-1)
    allowed = [set(logits[0].topk(5).indices.tolist())]
    order = probs[1].argsort(descending=True)
    mass = probs[1][order].cumsum(0) - probs[1][order]
    allowed.append(set(order[mass < 0.6].tolist()))
    allowed.append(set((probs[2] >= 0.2 * probs[2].max()).nonzero().flatten().tolist()))
    for step in range(300):
        got = sample(logits, batch(params, 100, steps=[step] * 3)).tolist()
        for i in range(3):
            assert got[i] in allowed[i], (i, got[i])


def test_greedy_rows_in_a_mixed_batch_take_the_argmax():
    logits = torch.randn(4, 50)
    params = [SamplingParams(temperature=0), SamplingParams(temperature=1.0), SamplingParams(temperature=0),
              SamplingParams(temperature=0.7, top_k=3)]
    got = sample(logits, batch(params, 50))
    assert got[0] == logits[0].argmax() and got[2] == logits[2].argmax()


def test_penalties_match_a_reference():
    torch.manual_seed(random.getrandbits(31))
    logits = torch.randn(1, 20)
    out, prompt = [3, 3, 7], [1, 7, 9]
    p = SamplingParams(temperature=0, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25)
    ref = logits[0].clone()
    for t in set(out) | set(prompt):  # repetition: prompt and output tokens
        ref[t] = ref[t] / 1.3 if ref[t] > 0 else ref[t] * 1.3
    for t in set(out):  # presence and frequency: output tokens only
        ref[t] -= 0.5 + 0.25 * out.count(t)
    got = sample(logits, batch([p], 20, outputs=[out], prompts=[prompt]))
    assert int(got[0]) == int(ref.argmax())
    # and the penalised logits themselves, through the greedy path with every other token banned
    for t in range(20):
        b = batch([p], 20, outputs=[out], prompts=[prompt])
        b.banned = [[u for u in range(20) if u != t]]
        assert int(sample(logits, b)[0]) == t


# ----- end to end on SmolLM2 ------------------------------------------------------------------
def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(smol_llm):
    p = SamplingParams(temperature=0.9, top_p=0.95, seed=random.getrandbits(40), max_tokens=24, ignore_eos=True)
    alone = smol_llm.generate(["Write a line about the sea:"], p)[0].token_ids
    others = [SamplingParams(temperature=1.2, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=10)]
    crowd = smol_llm.generate(["Hello there", "Write a line about the sea:", "Count: 1, 2,"],
                              [others[0], p, others[1]])
    assert crowd[1].token_ids == alone
    unseeded = smol_llm.generate(["Write a line about the sea:"] * 2,
                                 SamplingParams(temperature=0.9, max_tokens=24, ignore_eos=True))
    assert unseeded[0].token_ids != unseeded[1].token_ids  # each request draws its own seed


def test_stop_strings_are_cut_from_the_text(smol_llm):
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    full = smol_llm.generate(["The three primary colours are"], greedy)[0].text
    words = full.split()
    stop = words[len(words) // 2]
    cut = smol_llm.generate(["The three primary colours are"],
                            SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full[: full.index(stop)]
    kept = smol_llm.generate(["The three primary colours are"],
                             SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=stop,
                                            include_stop_str_in_output=True))[0]
    assert kept.text == full[: full.index(stop) + len(stop)]


def test_stop_token_ids_max_tokens_min_tokens_and_eos(smol_llm):
    greedy = SamplingParams(temperature=0, max_tokens=30)
    base = smol_llm.chat([{"role": "user", "content": "Say hi."}], greedy)[0]
    assert base.finish_reason == "stop" and base.token_ids[-1] in smol_llm.engine.eos_token_ids
    stop_at = base.token_ids[2]
    out = smol_llm.chat([{"role": "user", "content": "Say hi."}],
                        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_at]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at and out.token_ids == base.token_ids[:3]
    n = len(base.token_ids)
    longer = smol_llm.chat([{"role": "user", "content": "Say hi."}],
                           SamplingParams(temperature=0, max_tokens=n + 10, min_tokens=n + 5))[0]
    assert len(longer.token_ids) >= n + 5  # EOS was not allowed before min_tokens
    assert all(t not in smol_llm.engine.eos_token_ids for t in longer.token_ids[: n + 5])
    capped = smol_llm.generate(["Once upon a time"], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))[0]
    assert capped.finish_reason == "length" and len(capped.token_ids) == 7


def test_incremental_detokenization_of_multibyte_text(smol_llm):
    tok = smol_llm.tokenizer
    from glakeserve.tokenizer import REPLACEMENT, detokenize_step

    text = "Tokyo is 東京 🎉🚀 — naïve café, ünïcödé."
    ids = tok.encode(text, add_special_tokens=False)
    prompt = tok.encode("Say:", add_special_tokens=False)
    seq, pieces, prefix, read = list(prompt), [], max(0, len(prompt) - 5), len(prompt)
    held_back = 0
    for t in ids:
        seq.append(t)
        new, prefix, read = detokenize_step(tok, seq, prefix, read)
        held_back += new == ""
        assert REPLACEMENT not in new
        pieces.append(new)
    assert "".join(pieces) == tok.decode(ids)
    assert held_back > 0  # some characters really did span several tokens


def test_streaming_deltas_add_up_and_closing_aborts(smol_llm):
    p = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    texts = {}
    finals = []
    for out in smol_llm.generate_stream(["Once upon a time", "Hello"], p):
        texts[out.request_id] = texts.get(out.request_id, "") + out.delta_text
        if out.finished:
            assert texts[out.request_id] == out.text
            finals.append(out.text)
    # without streaming the text is decoded once at the end: the same text
    assert sorted(o.text for o in smol_llm.generate(["Once upon a time", "Hello"], p)) == sorted(finals)
    stream = smol_llm.generate_stream(["A long story:"], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
    for i, _ in enumerate(stream):
        if i == 5:
            break
    stream.close()
    assert not smol_llm.engine.has_unfinished_requests()
    assert smol_llm.engine.stats()["kv_pages"]["requests"] == 0  # its pages are nobody's at once


def test_logit_bias_moves_the_biased_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(3, 40)
    top = logits.argmax(dim=-1)
    other = (int(top[2]) + 1) % 40
    params = [SamplingParams(temperature=0, logit_bias={5: 100.0}), SamplingParams(temperature=0),
              SamplingParams(temperature=0, logit_bias={int(top[2]): -100.0, other: 0.5})]
    out = sample(logits.clone(), batch(params, 40))
    assert out[0] == 5 and out[1] == top[1]  # the unbiased row of the same batch is untouched
    expected = logits[2].clone()
    expected[top[2]] -= 100
    expected[other] += 0.5
    assert out[2] == expected.argmax()
    # sampled rows see it too: a bias of -100 on all but one token leaves that one
    hot = SamplingParams(temperature=1.0, logit_bias={t: -100.0 for t in range(40) if t != 17})
    assert set(sample(torch.zeros(8, 40), batch([hot] * 8, 40, steps=list(range(8)))).tolist()) == {17}


def test_logit_bias_out_of_the_vocabulary_is_refused(smol_llm):
    vocab = smol_llm.engine.model_config.vocab_size
    with pytest.raises(ValueError, match=rf"logit_bias keys must be token ids in \[0, {vocab}\), got \[{vocab}\]"):
        smol_llm.generate([[1, 2, 3]], SamplingParams(logit_bias={vocab: 5.0}))
