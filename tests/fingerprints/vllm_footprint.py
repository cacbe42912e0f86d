"""Run in a subprocess by test_vllm_agreement.py: vLLM starts worker processes, so it gets a
fresh interpreter with a ``__main__`` guard. Writes the (B, T, K) basis probabilities."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import numpy as np

    from cscr.fingerprints.basis import TokenBasis
    from cscr.llm.vllm_engine import VLLMBackend

    spec = json.loads(Path(sys.argv[1]).read_text())
    backend = VLLMBackend(spec["model"], max_model_len=1024, max_prompt_tokens=spec["max_prompt_tokens"])
    ids = TokenBasis(tuple(spec["basis"])).token_ids(backend.tokenizer)
    probs = backend.next_token_distributions(spec["texts"], spec["steps"], ids)
    gens = backend.generate(spec["texts"][:2], 12)
    np.save(spec["out"], probs)
    Path(spec["out"] + ".json").write_text(json.dumps([g.text for g in gens]))


if __name__ == "__main__":
    main()
