"""The engine's greedy output equals HF transformers' generate, token for token, on SmolLM2-135M
(float32): varied prompts in one batch, arriving at different steps, long ones prefilled in chunks."""

import torch

from glakeserve.engine import EngineConfig, LLMEngine
from glakeserve.sampling import SamplingParams

LONG = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based inks and a wooden press adapted from wine-making. "
) * 6
CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name a primary colour."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Another one, and why is it primary?"},
]


def test_greedy_matches_hf_generate(smollm2_dir, hf_smollm2):
    hf, tok = hf_smollm2
    prompts = [
        tok.encode("Hi"),
        tok.encode("The capital of France is"),
        tok.encode(LONG + "\nSummarise the paragraph above in one sentence:"),
        tok.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False),
        tok.apply_chat_template([{"role": "user", "content": "Write a haiku about snow."}], add_generation_prompt=True,
                                tokenize=False),
        tok.encode("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"),
        tok.encode("1, 2, 3, 5, 8, 13,"),
        tok.encode("Traduis en français : « Le chat dort sur le canapé » ->"),
        tok.encode("日本の首都は"),
    ]
    prompts = [p if isinstance(p, list) else tok.encode(p, add_special_tokens=False) for p in prompts]
    max_new = 20
    expected = []
    with torch.no_grad():
        for p in prompts:
            out = hf.generate(torch.tensor([p]), max_new_tokens=max_new, do_sample=False, eos_token_id=2,
                              pad_token_id=2, attention_mask=torch.ones(1, len(p), dtype=torch.long))
            expected.append(out[0, len(p):].tolist())

    engine = LLMEngine(EngineConfig(max_num_batched_tokens=96, max_num_seqs=6, check_integrity=True, max_model_len=1024,
                                    kv_cache_memory=256 << 20))
    params = SamplingParams(temperature=0, max_tokens=max_new)
    arrivals = {0: prompts[:3], 2: prompts[3:6], 5: prompts[6:]}  # step -> prompts added before it
    got, order, step = {}, [], 0
    while step in arrivals or engine.has_unfinished_requests():
        for p in arrivals.get(step, []):
            order.append(engine.add_request(p, params))
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out.token_ids
        step += 1
    assert engine.stats()["preemptions"] == 0
    for i, (rid, exp) in enumerate(zip(order, expected)):
        assert got[rid] == exp, f"prompt {i}: ours {got[rid]} vs HF {exp}"
    # the long prompt (> 96 tokens) really was chunked
    assert len(prompts[2]) > 96
    engine.close()
