#!/usr/bin/env python3
"""The reranker fixture and its reference scores (tests/python/test_rerank.py).

The fixture (qwen3-reranker-tiny/, named so that mlxd knows it reranks) is the tiny random Qwen3
of ../shared/fixtures/qwen3/f32 with "yes" and "no" added to its tokenizer (ids 512 and 513) and
two seeded random rows added to its tied embedding for them, so that it can judge as
Qwen3-Reranker does. The scores are
transformers' (pinned 5.25, f32) of the model card's recipe: the judging prompt around
`<Instruct>: … <Query>: … <Document>: …`, then softmax([logit(no), logit(yes)])[1] at the last
position. Tokenized whole by the `tokenizers` library, as mlxd tokenizes it.

    /work/refvenv/bin/python tests/data/rerank/make_refs.py
"""
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer
from transformers import AutoModelForCausalLM

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[2] / ".." / "shared"
SOURCE = SHARED / "fixtures" / "qwen3" / "f32"

PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
          "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
CASES = [
    {"instruction": None, "query": "What is the capital of China?",
     "documents": ["The capital of China is Beijing.", "Gravity pulls objects toward the earth.",
                   "Beijing hosts the Forbidden City.", "A cat sat on the mat."]},
    {"instruction": "Judge whether the passage is about animals", "query": "pets",
     "documents": ["Dogs and cats live with people.", "Stocks fell on Monday."]},
]


def make_fixture(folder):
    """Writes the reranker fixture into `folder`; returns the ids of yes and no."""
    folder.mkdir(exist_ok=True)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        shutil.copy(SOURCE / name, folder / name)
    tokenizer = Tokenizer.from_file(str(SOURCE / "tokenizer.json"))
    assert tokenizer.add_tokens([AddedToken("yes", special=False), AddedToken("no", special=False)]) == 2
    yes, no = tokenizer.token_to_id("yes"), tokenizer.token_to_id("no")
    tokenizer.save(str(folder / "tokenizer.json"))
    config = json.loads((SOURCE / "config.json").read_text())
    weights = load_file(str(SOURCE / "model.safetensors"))
    embed = weights["model.embed_tokens.weight"]
    assert (yes, no) == (embed.shape[0], embed.shape[0] + 1), (yes, no, embed.shape)
    extra = torch.randn(2, embed.shape[1], generator=torch.Generator().manual_seed(0)) * config["initializer_range"]
    weights["model.embed_tokens.weight"] = torch.cat([embed, extra]).contiguous()
    config["vocab_size"] = embed.shape[0] + 2
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return yes, no


def main():
    folder = HERE / "qwen3-reranker-tiny"
    yes, no = make_fixture(folder)
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    for case in CASES:
        instruction = case["instruction"] or DEFAULT_INSTRUCTION
        scores = []
        for doc in case["documents"]:
            text = f"{PREFIX}<Instruct>: {instruction}\n<Query>: {case['query']}\n<Document>: {doc}{SUFFIX}"
            ids = tokenizer.encode(text, add_special_tokens=False).ids
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1]
            pair = torch.log_softmax(torch.stack([logits[no], logits[yes]]), dim=0)
            scores.append(pair[1].exp().item())
        out.append({**case, "scores": scores})
    (HERE / "refs.json").write_text(json.dumps({"yes": yes, "no": no, "cases": out}, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
