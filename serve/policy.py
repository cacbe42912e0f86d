"""What an admin request may make the server load or call: only what the operator declared.

``POST /v1/experts`` names an expert's source. Without a policy a caller could point the server
at any URL (and have it send any environment variable there as the API key), or at any local
path (``/etc``, ``/proc/self/environ``, ``/dev/zero``). ``SourcePolicy`` allows:

- black-box (OpenAI-compatible) experts only through an upstream the operator declared: a base
  URL together with the one environment variable that holds its key (``cscr serve
  --allow-upstream URL=ENV``, plus every upstream of the served pool file);
- open-weights experts only from a packaged model (cscr.models.PACKAGED), a model source the
  pool file already uses, or a path inside a declared model root (``--model-root DIR``; the path
  is resolved first, so ``..`` and symlinks cannot leave the root);
- no recorded experts (they read routing tables from disk) and no ``engine_kwargs`` (engine
  arguments may name paths: they belong in the operator's pool file).

Every refusal is immediate (before anything is deployed): 403 ``source_not_allowed`` naming
what is allowed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from cscr.serve.protocol import ProtocolError
from pydantic import BaseModel, ConfigDict

from cscr.pool import ExpertSpec


def _url(url: str) -> str:
    return url.strip().rstrip("/").lower()


def parse_upstream(text: str) -> tuple[str, str | None]:
    """``URL=ENV`` (or a bare ``URL`` for an upstream without a key) -> (base URL, env name)."""
    url, sep, env = text.partition("=")
    if not url.strip().startswith(("http://", "https://")):
        raise ValueError(f"upstream {text!r}: expected URL=ENV with an http(s) base URL")
    if sep and not env.strip():
        raise ValueError(f"upstream {text!r}: name the environment variable after '='")
    return url.strip(), (env.strip() or None) if sep else None


class SourcePolicy(BaseModel):
    """The operator's declarations (frozen; crosses Ray as a dict)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    upstreams: list[tuple[str, str | None]] = []  # (base URL, env var of its key) black-box experts may use
    models: list[str] = []  # model sources open-weights experts may use as they are (the pool file's)
    model_roots: list[str] = []  # folders local model paths must resolve into

    @classmethod
    def build(cls, specs: Iterable[ExpertSpec], upstreams: Sequence[str] = (),
              model_roots: Sequence[str] = ()) -> SourcePolicy:
        """The policy of a served pool (its own sources) plus the declared extras."""
        ups: list[tuple[str, str | None]] = [parse_upstream(u) for u in upstreams]
        models: list[str] = []
        for s in specs:
            if s.kind == "black-box" and s.source.base_url:
                ups.append((s.source.base_url, s.source.api_key_env))
            elif s.kind == "open-weights" and s.source.model:
                models.append(s.source.model)
        roots = [str(Path(r).expanduser().resolve()) for r in model_roots]
        for r in roots:
            if not Path(r).is_dir():
                raise ValueError(f"model root {r} is not a folder")
        return cls(upstreams=ups, models=models, model_roots=roots)

    def check(self, spec: ExpertSpec) -> None:
        """Refuse (403) a spec whose source the operator did not declare."""
        if spec.kind == "recorded":
            self._refuse(spec, "recorded experts read routing tables from disk: declare them in the pool file")
        if spec.engine_kwargs:
            self._refuse(spec, "engine_kwargs are the operator's: set them in the pool file")
        if spec.kind == "black-box":
            want = (_url(spec.source.base_url or ""), spec.source.api_key_env)
            allowed = {(_url(u), e) for u, e in self.upstreams}
            if want not in allowed:
                listed = ", ".join(f"{u}={e or '(no key)'}" for u, e in self.upstreams) or "none"
                self._refuse(spec, f"upstream {spec.source.base_url} with key variable "
                                   f"{spec.source.api_key_env or '(none)'} is not declared (declared: {listed}; "
                                   "the operator adds one with --allow-upstream URL=ENV)")
            return
        self._check_model(spec)

    def _check_model(self, spec: ExpertSpec) -> None:
        from cscr.models import PACKAGED

        source = spec.source.model or ""
        if source in PACKAGED or source in self.models:
            return
        path = Path(source).expanduser()
        if self.model_roots and (path.is_absolute() or source.startswith((".", "~"))):
            real = path.resolve()
            for root in self.model_roots:
                if real == Path(root) or Path(root) in real.parents:
                    if not real.exists():
                        self._refuse(spec, f"model path {source} does not exist")
                    return
        roots = ", ".join(self.model_roots) or "none declared (--model-root DIR)"
        self._refuse(spec, f"model source {source!r} is not allowed: use a packaged model "
                           f"({', '.join(sorted(PACKAGED))}), one the pool file uses, or a path inside a model root "
                           f"({roots})")

    @staticmethod
    def _refuse(spec: ExpertSpec, why: str) -> None:
        raise ProtocolError(f"expert {spec.name!r}: {why}", status=403, code="source_not_allowed",
                            param="expert.source")

