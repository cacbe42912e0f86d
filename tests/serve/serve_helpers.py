"""Small real parts for the serving tests: tiny random causal LMs saved from a config, a plain
dot-product router on the Router interface, and the real MiniLM encoder."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import numpy as np

from cscr.routers.base import Router


def unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


class DotRouter(Router):
    """Utilities = emb . d_m on the top-k experts (-inf elsewhere); live add/remove."""

    def __init__(self, descriptors: dict[str, np.ndarray], costs: dict[str, float], top_k: int = 4) -> None:
        super().__init__()
        self.top_k = top_k
        self.expert_names = list(descriptors)
        self.desc = np.stack([unit(descriptors[n]) for n in self.expert_names])  # (M, d)
        self.costs = np.array([costs[n] for n in self.expert_names], dtype=np.float64)

    def utilities(self, emb: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        s = np.asarray(emb, dtype=np.float64) @ self.desc.T  # (n, M)
        k = min(self.top_k, s.shape[1])
        kth = -np.sort(-s, axis=1)[:, k - 1 : k]  # (n, 1)
        return np.where(s >= kth, s, -np.inf)

    def add_expert(self, name: str, descriptor: np.ndarray, cost: float) -> None:
        if descriptor.shape != (self.desc.shape[1],):
            raise ValueError(f"descriptor has dimension {descriptor.shape}, the index {self.desc.shape[1]}")
        self.expert_names.append(name)
        self.desc = np.vstack([self.desc, unit(descriptor)[None]])
        self.costs = np.append(self.costs, cost)

    def remove_expert(self, name: str) -> None:
        j = self.expert_names.index(name)
        self.expert_names.pop(j)
        self.desc = np.delete(self.desc, j, axis=0)
        self.costs = np.delete(self.costs, j)


def make_tiny_lm(out_dir: Path, seed: int) -> Path:
    """A 2-layer random GPT-2 with SmolLM2's tokenizer (and chat template), saved as an HF folder."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from cscr.models import local_model

    if (out_dir / "config.json").is_file():
        return out_dir
    tok = AutoTokenizer.from_pretrained(local_model("smollm2"))
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HangingServer:
    """A loopback TCP server that accepts connections and never answers (an upstream that hangs)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = int(self.sock.getsockname()[1])
        self.conns: list[socket.socket] = []
        self._stop = False
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
                self.conns.append(conn)
            except OSError:
                continue

    def close(self) -> None:
        self._stop = True
        self.thread.join(timeout=2)
        for c in self.conns:
            c.close()
        self.sock.close()


RB_EXPERTS = ["mistralai/mistral-7b-chat", "mistralai/mixtral-8x7b-chat", "gpt-4-1106-preview"]


def make_trained_run(run_dir: Path, data_dir: Path, experts: list[str] = RB_EXPERTS,
                     sizes: dict[str, int] | None = None, epochs: int = 3) -> Path:
    """A real trained CSCR run on a slice of the real RouterBench table: table, MiniLM embeddings,
    probe-outcome descriptors and a head trained for a few epochs with the plain loop."""
    from cscr.config import DataConfig, IndexConfig, TrainConfig
    from cscr.data import load_dataset
    from cscr.encoder import Encoder, embed_table
    from cscr.run import RunPaths
    from cscr.train import train_run

    sizes = sizes or {"train": 120, "val": 30, "probe": 16, "test": 16}
    table = load_dataset("routerbench", DataConfig(data_dir=str(data_dir), probe_size=sizes["probe"]))
    length = np.array([len(str(t)) for t in table.texts])
    # the shortest prompts of each split (the few-shot ARC prompts are long: slow to embed here)
    rows = np.concatenate([idx[np.argsort(length[idx], kind="stable")[:k]]
                           for s, k in sizes.items() for idx in [table.split_index(s)]])
    sub = table.subset(np.sort(rows), experts)
    paths = RunPaths.of(run_dir)
    sub.save(paths.table)
    embed_table(sub, Encoder(), paths.embeddings, progress=None)
    cfg = TrainConfig(epochs=epochs, batch_size=64, index=IndexConfig(top_k=len(experts)))
    train_run(str(paths.root), "cscr", cfg, log=None)
    return paths.root
