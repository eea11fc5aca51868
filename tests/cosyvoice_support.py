"""Test helpers: the CosyVoice2 reference (random weights) through its scratch venv, and checks the
CosyVoice2 and CosyVoice3 family tests share.

The reference lives in .cosyvoice_ref (built by scripts/cosyvoice_reference.sh) and is only ever
run in other processes, so none of its packages or stubs leak into the test process. Its scripts
run in children forked from one long-lived reference process (reference_zygote.py) that imported
upstream once: each job behaves as `python argv...` would, without its ~12 s of imports.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
BUILD_HINT = "bash scripts/cosyvoice_reference.sh"

# Official file names of a CosyVoice2-0.5B folder.
OFFICIAL_FILES = (
    "cosyvoice2.yaml", "llm.pt", "flow.pt", "hift.pt", "campplus.onnx", "speech_tokenizer_v2.onnx",
    "CosyVoice-BlankEN/config.json", "CosyVoice-BlankEN/vocab.json", "CosyVoice-BlankEN/merges.txt",
)


def reference_python() -> Path | None:
    """The reference venv's interpreter (COSYVOICE_REF overrides the folder), or None."""
    ref = Path(os.environ.get("COSYVOICE_REF", ROOT / ".cosyvoice_ref"))
    py = ref / "bin" / "python"
    return py if py.is_file() and os.access(py, os.X_OK) else None


def require_reference() -> Path:
    """The reference python, or skip the calling test saying how to build it."""
    py = reference_python()
    if py is None:
        pytest.skip(f"CosyVoice2 reference venv (.cosyvoice_ref) missing: build it with `{BUILD_HINT}`")
    return py


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")


class _Zygote:
    """The session's reference process: started on first use, stopped at exit."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()

    def run(self, python: str, argv: list[str], stdin: str | None) -> tuple[int, str, str]:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self.proc = subprocess.Popen([python, str(Path(__file__).with_name("reference_zygote.py"))],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                             env=_env(), cwd=ROOT)
                atexit.register(self.proc.kill)
                self._answer("ready")
            self.proc.stdin.write(json.dumps({"argv": argv, "stdin": stdin}) + "\n")
            self.proc.stdin.flush()
            answer = self._answer("rc")
            return answer["rc"], answer["stdout"], answer["stderr"]

    def _answer(self, key: str) -> dict:
        """The next JSON line holding `key` (lines an import printed are skipped)."""
        for line in self.proc.stdout:
            if line.startswith(f'{{"{key}"'):
                return json.loads(line)
        raise RuntimeError(f"the reference process ended (exit code {self.proc.wait()})")


_ZYGOTE = _Zygote()


def _run(cmd: list[str], stdin: str | None = None, timeout: float = 600) -> str:
    python = reference_python()
    if python is not None and str(cmd[0]) == str(python):
        rc, out, err = _ZYGOTE.run(str(python), [str(c) for c in cmd[1:]], stdin)
    else:
        res = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)
        rc, out, err = res.returncode, res.stdout, res.stderr
    if rc != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({rc}):\n{err[-4000:]}")
    return out


def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, seed: int = 0) -> Path:
    """A tiny random CosyVoice2 folder, written once per test session (pytest's tmp dir)."""
    py = require_reference()
    root = tmp_path_factory.getbasetemp() / f"cosyvoice2-tiny-{seed}"
    if not (root / "spk2info.pt").is_file():  # spk2info.pt is written last
        _run([str(py), str(SCRIPTS / "cosyvoice_testmodel.py"), str(root), "--size", "tiny", "--seed", str(seed)])
    return root


def run_reference(model_dir: Path, request: dict, out: Path) -> dict[str, np.ndarray]:
    """Run scripts/cosyvoice_reference_run.py on model_dir with request; the npz as a dict."""
    py = require_reference()
    _run([str(py), str(SCRIPTS / "cosyvoice_reference_run.py"), str(model_dir), str(out)], stdin=json.dumps(request))
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


_REFERENCE_SHAPES = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import cosyvoice_reference_run as ref
from hyperpyyaml import load_hyperpyyaml
ref.SECTIONS = (sys.argv[3],)
with open(sys.argv[2]) as f:
    text = ref.trimmed_yaml(f.read())
with torch.device("meta"):
    module = load_hyperpyyaml(text)[sys.argv[3]]
print(json.dumps({k: list(v.shape) for k, v in module.state_dict().items()}))
"""


def published_yaml(folder: Path) -> Path:
    """cosyvoice2.yaml with CosyVoice2-0.5B's published numbers, written into ``folder``."""
    import sys

    sys.path.insert(0, str(SCRIPTS))
    try:
        import cosyvoice_testmodel as testmodel
    finally:
        sys.path.remove(str(SCRIPTS))
    path = folder / "cosyvoice2.yaml"
    path.write_text(testmodel.YAML.format(**testmodel.SIZES["published"]))
    return path


def reference_shapes(yaml_path: Path, section: str) -> dict[str, list[int]]:
    """State-dict keys -> shapes of the reference's ``section`` module ("flow", "hift") built on the
    meta device from ``yaml_path`` by upstream's own hyperpyyaml construction."""
    py = require_reference()
    out = _run([str(py), "-c", _REFERENCE_SHAPES, str(SCRIPTS), str(yaml_path), section])
    return json.loads(out.strip().splitlines()[-1])


# -- shared by the CosyVoice2 and CosyVoice3 family tests ----------------------------------------------
def write_prompt(path: Path) -> Path:
    """Three seconds of a voiced, amplitude-modulated tone at 16 kHz (speech-like enough for the
    stand-in front ends)."""
    import soundfile as sf

    t = np.arange(48000) / 16000
    wave = 0.3 * np.sin(2 * np.pi * 140 * t + 2 * np.sin(2 * np.pi * 4 * t)) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    sf.write(path, wave.astype(np.float32), 16000)
    return path


def check_server(rt, prompt: Path, text: str) -> None:
    """On a real server on loopback: voice upload, speech through the openai client, streamed pcm with
    `instructions`, and a silent prompt refused with a 4xx naming it."""
    import io

    import httpx
    import soundfile as sf

    openai = pytest.importorskip("openai")
    from server_support import ServerThread
    from edge_runtime.serving.server import ServerSettings, create_app

    with ServerThread(create_app(rt, ServerSettings(warm_up=False))) as server:
        up = httpx.post(f"{server.url}/v1/voices", files={"file": ("me.wav", prompt.read_bytes(), "audio/wav")},
                        data={"transcript": "A prompt to clone."}, timeout=300)
        assert up.status_code in (200, 201), up.text
        voice_id = up.json()["id"]
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300)
        whole = client.audio.speech.create(model=rt.model.model_id, voice=voice_id, input=text, response_format="wav")
        audio, rate = sf.read(io.BytesIO(whole.content))
        assert rate == 24000 and len(audio) > 0
        with client.audio.speech.with_streaming_response.create(
                model=rt.model.model_id, voice=voice_id, input=text, response_format="pcm",
                instructions="Speak slowly.", extra_body={"seed": 4}) as response:
            pcm = b"".join(response.iter_bytes())
        # seeded: a random CosyVoice3 LM may pick one of the stop ids its mask leaves open (upstream's
        # quirk) at the very first step and speak nothing; seed 4 speaks, and the same seed repeats
        assert len(pcm) > 0 and len(pcm) % 2 == 0
        with client.audio.speech.with_streaming_response.create(
                model=rt.model.model_id, voice=voice_id, input=text, response_format="pcm",
                instructions="Speak slowly.", extra_body={"seed": 4}) as response:
            assert b"".join(response.iter_bytes()) == pcm
        silent = io.BytesIO()
        sf.write(silent, np.zeros(16000, np.float32), 16000, format="WAV")
        bad = httpx.post(f"{server.url}/v1/voices", files={"file": ("s.wav", silent.getvalue(), "audio/wav")},
                         timeout=300)
        assert 400 <= bad.status_code < 500 and "silent" in bad.text


def check_backend_equals_resident(folder: Path, resident: tuple, text: str, seed: int, tier: tuple[str, ...],
                                  backend: str, target: str) -> None:
    """``resident`` = (voice, whole audio, streamed chunks) of the resident runtime; the same request
    under ``backend`` on a tier too small for the model gives exactly that audio."""
    import edge_runtime

    if backend == "deepspeed":
        pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    voice, whole, chunks = resident
    rt = edge_runtime.load(str(folder), profile="6gb", overrides=(*tier, f"offload.target={target}",
                                                                 f"offload.backend={backend}"))
    try:
        placed = rt.placement
        assert placed["backend"] == backend and placed["streamed_bytes"] > 0
        assert np.array_equal(rt.synthesize(text, voice=voice, seed=seed)[0], whole)
        streamed = list(rt.stream(text, voice=voice, seed=seed))
        assert len(streamed) == len(chunks) > 1
        assert all(np.array_equal(a, b) for a, b in zip(streamed, chunks))
    finally:
        rt.close()
