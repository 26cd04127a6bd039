"""The demo's web app: one page (page.html) and a JSON API over `cmath_runtime.Conversation`.

POST /api/turn {"session", "speaker", "text", "precision"}: one more utterance in that session's conversation;
POST /api/transcript {"transcript", "precision"}: a new session from `speaker: text` lines. Both answer the whole
conversation's emotions so far (a causal export streams: each utterance is computed once, by its step graph; a
bidirectional one recomputes, so later turns may revise earlier emotions; one whose text encoder reads future
turns is read whole by `predict` after every turn). Bad input is answered with status 400
and {"error": "..."} naming the field, which the page shows.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

import cmath_runtime
from cmath_runtime.errors import CmathError, InputError
from cmath_runtime.manifest import Manifest, read_manifest

PAGE = Path(__file__).with_name("page.html")
MAX_SESSIONS = 64  # conversations kept in memory; the least recently used one goes first
MAX_TEXT = 2000  # characters of one utterance


@dataclass
class Session:
    model: cmath_runtime.EmotionModel
    # None when the text encoder reads future turns: the whole conversation is read again after each turn
    conversation: cmath_runtime.Conversation | None
    speakers: dict[str, int] = field(default_factory=dict)  # name -> id, in order of first appearance
    names: list[str] = field(default_factory=list)  # each utterance's speaker name
    texts: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    probs: Any = None  # (n, classes) of the whole conversation so far (predict), when conversation is None

    def __len__(self) -> int:
        return len(self.texts)

    def speaker_id(self, name: str, num_speakers: int) -> int:
        """Ids by first appearance, as cmath-prepare numbers a conversation's speakers (capped at the last id)."""
        return self.speakers.setdefault(name, min(len(self.speakers), num_speakers - 1))


class Demo:
    """The export, its models by precision (loaded on first use) and the live sessions."""

    def __init__(self, export_dir: str | Path, threads: int | None = None) -> None:
        self.manifest: Manifest = read_manifest(export_dir)
        self.export_dir = self.manifest.directory
        self.threads = threads
        self.precisions = [
            a.precision for a in self.manifest.artifacts.values() if a.precision in ("fp32", "int8")
        ]
        self.models: dict[str, cmath_runtime.EmotionModel] = {}
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.lock = threading.Lock()

    @property
    def problem(self) -> str | None:
        """Why this export cannot take typed text, or None."""
        m = self.manifest
        if not m.text_encoder:
            return (
                f"This export reads feature vectors ({', '.join(m.modalities)}), not text: it has no text "
                "encoder. Try a text export: a run trained on cmath-prepare features, exported with its "
                "text encoder (cmath-export without --no-text-encoder)."
            )
        if tuple(m.modalities) != ("t",):
            return (
                f"This export needs the modalities {', '.join(m.modalities)}; the page can give text (t) only. "
                "Try a text-only export."
            )
        return None

    def info(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "model": m.model_name,
            "labels": list(m.label_names),
            "causal": m.causal,
            "num_speakers": m.num_speakers,
            "precisions": self.precisions,
            "encoder": (m.text_encoder or {}).get("name"),
            "problem": self.problem,
        }

    def model(self, precision: Any) -> cmath_runtime.EmotionModel:
        if precision not in self.precisions:
            raise InputError("precision", f"one of {self.precisions}", repr(precision))
        if precision not in self.models:
            self.models[precision] = cmath_runtime.load(
                self.export_dir, backend="cpu", precision=precision, threads=self.threads
            )
        return self.models[precision]

    def new_session(self, precision: Any) -> tuple[str, Session]:
        if self.problem:
            raise CmathError(self.problem)
        key = secrets.token_hex(8)
        model = self.model(precision)
        turns = (self.manifest.text_encoder or {}).get("turns") or {}
        session = Session(model, None if turns.get("future") else cmath_runtime.Conversation(model))
        self.sessions[key] = session
        while len(self.sessions) > MAX_SESSIONS:
            self.sessions.popitem(last=False)
        return key, session

    def add(self, session: Session, speaker: Any, text: Any, field: str) -> None:
        speaker = speaker.strip() if isinstance(speaker, str) else speaker
        if not isinstance(speaker, str) or not speaker:
            raise InputError(f"{field}.speaker", "a speaker name", repr(speaker))
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{field}.text", "the utterance's text (not empty)", repr(text))
        if len(text) > MAX_TEXT:
            raise InputError(f"{field}.text", f"at most {MAX_TEXT} characters", f"{len(text)} characters")
        if len(session) >= self.manifest.max_len:
            raise InputError(
                field, f"at most {self.manifest.max_len} utterances (the export's max_len)", len(session) + 1
            )
        sid = session.speaker_id(speaker, session.model.num_speakers)
        if session.conversation is not None:
            session.conversation.add(sid, text=text.strip())
        else:  # nothing changes unless the whole conversation with the new turn is read
            [pred] = session.model.predict(
                [{"speakers": [*session.ids, sid], "texts": [*session.texts, text.strip()]}]
            )
            session.probs = pred.probs
        session.texts.append(text.strip())
        session.ids.append(sid)
        session.names.append(speaker)

    def turn(self, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            key = body.get("session")
            session = self.sessions.get(key) if isinstance(key, str) else None
            if (
                not isinstance(key, str)
                or session is None
                or session.model.precision != body.get("precision", "fp32")
            ):
                key, session = self.new_session(body.get("precision", "fp32"))
            else:
                self.sessions.move_to_end(key)
            self.add(session, body.get("speaker"), body.get("text"), f"utterances[{len(session)}]")
            return self.state(key, session)

    def transcript(self, body: dict[str, Any]) -> dict[str, Any]:
        text = body.get("transcript")
        if not isinstance(text, str) or not text.strip():
            raise InputError("transcript", "lines of 'speaker: text'", repr(text))
        turns = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            name, sep, said = line.partition(":")
            if not sep or not name.strip() or not said.strip():
                raise InputError(f"transcript line {number}", "'speaker: text'", repr(line.strip()))
            turns.append((name.strip(), said.strip()))
        with self.lock:
            key, session = self.new_session(body.get("precision", "fp32"))
            for name, said in turns:
                self.add(session, name, said, f"utterances[{len(session)}]")
            return self.state(key, session)

    def state(self, key: str, session: Session) -> dict[str, Any]:
        labels = session.model.label_names
        if session.conversation is not None:
            probs = [e.probs for e in session.conversation.emotions()]
            path = session.conversation.path
        else:
            probs, path = list(session.probs if session.texts else []), "whole conversation"
        return {
            "session": key,
            "precision": session.model.precision,
            "path": path,
            "utterances": [
                {
                    "speaker": name,
                    "text": text,
                    "label": labels[int(p.argmax())],
                    "confidence": float(p.max()),
                    "probs": [float(x) for x in p],
                }
                for name, text, p in zip(session.names, session.texts, probs, strict=True)
            ],
        }


def make_app(demo: Demo) -> Starlette:
    async def page(_: Request) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def info(_: Request) -> JSONResponse:
        return JSONResponse(demo.info())

    def endpoint(action: Any) -> Any:
        async def handle(request: Request) -> JSONResponse:
            try:
                body = await request.json()
            except ValueError:
                return JSONResponse({"error": "request: expected a JSON object"}, status_code=400)
            if not isinstance(body, dict):
                return JSONResponse({"error": "request: expected a JSON object"}, status_code=400)
            try:
                from starlette.concurrency import run_in_threadpool

                return JSONResponse(await run_in_threadpool(action, body))
            except CmathError as e:
                return JSONResponse({"error": str(e)}, status_code=400)

        return handle

    return Starlette(
        routes=[
            Route("/", page),
            Route("/api/info", info),
            Route("/api/turn", endpoint(demo.turn), methods=["POST"]),
            Route("/api/transcript", endpoint(demo.transcript), methods=["POST"]),
        ]
    )
