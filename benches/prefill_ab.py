#!/usr/bin/env python3
"""One greedy completion per prompt length against a server, printed as JSON (ids and the chosen
tokens' logprobs), so two runs (e.g. MLXD_CUDA_PREFILL_KERNEL=0 and the default) can be compared.

    python3 benches/prefill_ab.py --url http://127.0.0.1:8080 > a.json"""
import argparse
import json
import random
import urllib.request


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--lengths", default="20,100,700,1500")
    a = ap.parse_args()
    rng = random.Random(1)
    out = []
    for n in map(int, a.lengths.split(",")):
        prompt = [rng.randrange(3, 259) for _ in range(n)]
        body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "logprobs": 1, "return_token_ids": True}
        req = urllib.request.Request(a.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        choice = json.load(urllib.request.urlopen(req))["choices"][0]
        out.append({"n": n, "ids": choice["token_ids"], "logprobs": choice["logprobs"]["token_logprobs"]})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
