"""Memory and time of the training loss: transformers' full-logit loss against mmkit's logits at the
supervised positions only (``mmkit.modeling.loss``).

    python benchmarks/bench_supervised_logits.py [--quick]

Each case runs in its own process: a one-layer LLaMA-architecture LM (hidden 256, tied embeddings, the
vocabulary of a real model family), one sequence of ``length`` tokens of which the last ``answer``
fraction is supervised (LLaVA-style conversations: about a third; a short-answer VQA: a few percent).
Reported: the forward + backward's peak resident memory above what the process held before it (the
high-water mark is reset through ``/proc/self/clear_refs``), and its time (median of 3). The layers
are kept tiny so that the output layer and the loss, the part that changes, dominate what is measured.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

CASES = [  # (name, vocabulary, length, supervised fraction)
    ("LLaMA-2 vocab, 2k tokens, 1/3 answer", 32000, 2048, 1 / 3),
    ("Qwen2 vocab, 2k tokens, 1/3 answer", 151936, 2048, 1 / 3),
    ("Qwen2 vocab, 4k tokens, 1/3 answer", 151936, 4096, 1 / 3),
    ("Qwen2 vocab, 4k tokens, short answer (16 tokens)", 151936, 4096, 16 / 4096),
]
QUICK = [("LLaMA-2 vocab, 256 tokens, 1/3 answer", 32000, 256, 1 / 3)]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(mode: str, vocab: int, length: int, answer: float) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from mmkit.modeling.loss import next_token_targets, supervised_forward
    from mmkit.prompt import IGNORE_INDEX

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, num_hidden_layers=1, num_attention_heads=4,
                         intermediate_size=512, max_position_embeddings=length, tie_word_embeddings=True)
    llm = AutoModelForCausalLM.from_config(config).train()
    llm.requires_grad_(False)  # frozen, as under LoRA; the gradient flows to the input embeddings
    embeds = torch.randn(1, length, 256)
    labels = torch.full((1, length), IGNORE_INDEX)
    supervised = max(1, round(length * answer))
    labels[0, -supervised:] = torch.randint(0, vocab, (supervised,))

    def step() -> None:
        e = embeds.clone().requires_grad_(True)
        if mode == "full":
            loss = llm(inputs_embeds=e, labels=labels, use_cache=False).loss
        else:
            loss = supervised_forward(llm, next_token_targets(labels), inputs_embeds=e, use_cache=False).loss
        loss.backward()

    step()  # allocator warm-up
    times, peaks = [], []
    for _ in range(3):
        before = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        peaks.append(_rss_kib("VmHWM") - before)
    return {"seconds": statistics.median(times), "peak_mib": max(peaks) / 1024}


def main(argv: list[str]) -> None:
    if argv[:1] == ["--child"]:
        mode, vocab, length, answer = argv[1], int(argv[2]), int(argv[3]), float(argv[4])
        print(json.dumps(measure(mode, vocab, length, answer)))
        return
    cases = QUICK if "--quick" in argv else CASES
    print(f"{'case':52} {'full: MiB':>10} {'ours: MiB':>10} {'memory':>7} {'full: s':>8} {'ours: s':>8} {'speed':>6}")
    for name, vocab, length, answer in cases:
        got = {}
        for mode in ("full", "supervised"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, str(vocab), str(length), str(answer)],
                                 check=True, capture_output=True, text=True)
            got[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        full, ours = got["full"], got["supervised"]
        print(f"{name:52} {full['peak_mib']:10.0f} {ours['peak_mib']:10.0f} {full['peak_mib'] / ours['peak_mib']:6.1f}x "
              f"{full['seconds']:8.3f} {ours['seconds']:8.3f} {full['seconds'] / ours['seconds']:5.1f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
