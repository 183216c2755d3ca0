"""Generation (#16): per-stage KV cache, continuous batching, sampling, and the HTTP APIs.

In-process tests run the zoo's decoders cut into 2 :class:`GenStage` objects under the real scheduler, sequences
arriving at different steps, against ``model.generate(do_sample=False)``. The served tests start one 2-stage
pipeline of worker processes on a saved Llama folder with a character-level ``tokenizer.json`` built here, and talk
to it over HTTP.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import threading
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from stagewise.serve._gen_engine import Scheduler, SeqState  # noqa: E402
from stagewise.serve._gen_model import eos_token_ids  # noqa: E402
from stagewise.serve._gen_sampling import SamplingError, SamplingParams, StopText, choose_token  # noqa: E402
from stagewise.serve._gen_stage import GenStage, layer_split, slots_in_budget  # noqa: E402
from stagewise.zoo import hf  # noqa: E402

DECODERS = ["gpt2", "llama", "qwen2", "mistral", "gemma", "falcon", "bloom"]


def _hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n)
    return out[0, len(prompt):].tolist()


def _prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 120, (n,), generator=g).tolist() for n in lengths]


def _run_in_process(stages: list[GenStage], sched: Scheduler, arrivals: dict[int, list[SeqState]], n: int,
                    eos: tuple[int, ...]) -> None:
    """Drive the scheduler like the backend does: steps through the stages in order, greedy tokens, arrivals by step."""
    step_no = 0
    while arrivals or sched.running or sched.waiting:
        for seq in arrivals.pop(step_no, []):
            sched.add(seq)
        steps = []  # as many as may be in flight at once, composed before any returns
        while (step := sched.next_step()) is not None:
            steps.append(step)
        for step in steps:
            meta, ids = step.table()
            out = None
            for st in stages:
                out = st.run_rows(torch.tensor(meta), torch.tensor(ids), out)
            sched.finish_step(step.number)
            for i, (seq, _, _) in enumerate(step.rows):
                if seq.cached < len(seq.tokens):  # a prefill chunk with more to come
                    continue
                seq.tokens.append(int(out[i].argmax()))
                if len(seq.output) >= n or seq.tokens[-1] in eos:
                    sched.release(seq)
        step_no += 1


@pytest.mark.parametrize("budget", [8, 64])
@pytest.mark.parametrize("name", DECODERS)
def test_two_stages_match_hf_generate(name: str, budget: int) -> None:
    """Greedy tokens of 2 stages under the continuous-batching scheduler == HF generate, prompt by prompt. A step
    budget of 8 tokens splits prefills into chunks (a fresh chunk batches with another prefill, a continued one runs
    alone); 64 batches all fresh prefills of a step, padded."""
    model = hf.HF_MODELS[name]().model.eval()
    stages = [GenStage(copy.deepcopy(model), stage=s, stages=2, slots=3, max_len=64) for s in range(2)]
    assert stages[0].layer_range == (0, 1) and stages[1].layer_range == (1, 2)
    n = 10
    prompts = _prompts(len(name), (5, 9, 2, 7, 12))
    # 5 sequences, 3 slots, 2 steps in flight: queueing, joins and leaves at every step
    sched = Scheduler(slots=3, inflight=2, max_queue=8, max_batch_tokens=budget)
    seqs = [SeqState(i, list(p), len(p)) for i, p in enumerate(prompts)]
    arrivals = {0: seqs[:2], 3: seqs[2:4], 7: seqs[4:]}
    _run_in_process(stages, sched, arrivals, n, eos_token_ids(model))
    for seq, prompt in zip(seqs, prompts):
        assert seq.output == _hf_greedy(model, prompt, n), f"{name}: prompt {seq.id} diverged"
    assert sched.used_slots == 0


def test_layer_split_and_cache_bound() -> None:
    assert layer_split(5, 2) == [(0, 3), (3, 5)]
    with pytest.raises(ValueError, match="cannot split 2 decoder layers into 3"):
        layer_split(2, 3)
    stage = GenStage(hf.llama().model, stage=0, stages=1, slots=2, max_len=8)
    assert stage.warm_up() == 2 * 2 * (2 * 2 * 8 * 16) * 4  # layers x (k, v) x slots*heads*len*dim x fp32 bytes
    with pytest.raises(ValueError, match="KV cache holds 8"):
        stage.run_rows(torch.tensor([[0, 0, 9]]), torch.zeros(9, dtype=torch.long), None)


def test_kv_budget_sets_the_slots() -> None:
    # mistral: 1 key/value head (grouped-query); a sequence of 64 tokens on 1 of 2 layers = 2 x 1 x 64 x 16 x 4 bytes
    per_stage = 2 * 1 * 64 * 16 * 4
    assert slots_in_budget(hf.mistral().model, stages=2, max_len=64, budget_bytes=10 * per_stage + 5) == 10
    with pytest.raises(ValueError, match="holds no sequence"):
        slots_in_budget(hf.mistral().model, stages=2, max_len=64, budget_bytes=per_stage - 1)


def test_scheduler_spreads_sequences_over_steps_in_flight() -> None:
    sched = Scheduler(slots=4, inflight=2, max_queue=0, max_batch_tokens=64)
    seqs = [SeqState(i, [1], 1) for i in range(4)]
    for s in seqs:
        sched.add(s)
    assert not sched.can_queue() and sched.used_slots == 0
    first, second = sched.next_step(), sched.next_step()
    assert first is not None and second is not None and sched.next_step() is None  # 2 in flight at most
    assert len(first.rows) == 2 and len(second.rows) == 2  # 4 ready sequences over 2 free steps
    sched.release(seqs[0])  # cancelled while its step is in flight: the slot stays taken until the step returns
    assert sched.used_slots == 4
    sched.finish_step(first.number)
    assert sched.used_slots == 3 and seqs[1].cached == 1 and not seqs[1].busy


def test_sampling_rules() -> None:
    logits = torch.tensor([0.0, 3.0, 2.9, -1.0])
    assert choose_token(logits, SamplingParams(temperature=0), None) == 1
    top2 = SamplingParams(temperature=5.0, top_k=2, seed=1)
    gen = top2.generator()
    assert {choose_token(logits, top2, gen) for _ in range(200)} == {1, 2}
    nucleus = SamplingParams(temperature=1.0, top_p=0.3, seed=1)
    gen = nucleus.generator()
    assert {choose_token(logits, nucleus, gen) for _ in range(100)} == {1}
    draws = [[choose_token(logits, p, p.generator()) for _ in range(1)] for p in
             [SamplingParams(temperature=2.0, seed=7) for _ in range(2)]]
    assert draws[0] == draws[1]
    with pytest.raises(SamplingError, match="top_p"):
        SamplingParams(top_p=0)


def test_stop_text_holds_back_a_possible_stop() -> None:
    st = StopText(["END"])
    assert st.advance("abcE", final=False) == "ab"
    assert st.advance("abcEN", final=False) == "c"
    assert st.advance("abcENDxyz", final=False) == "" and st.stopped


# ---------------------------------------------------------------------------------------------------- served
def _char_tokenizer(vocab: int, eos: int) -> object:
    """Character-level tokenizer: id = ord(char) for the printable ASCII range; ``eos`` is a special token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    table = {chr(i): i for i in range(vocab)}
    table["<unk>"], table["</s>"] = 0, eos
    del table[chr(0)], table[chr(eos)]
    tok = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["</s>"])
    return tok


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("llama")
    model = hf.llama().model
    model.save_pretrained(folder)
    eos = int(model.config.eos_token_id)
    _char_tokenizer(model.config.vocab_size, eos).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "</s>",
        "chat_template": "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}"}))
    return str(folder)


@pytest.fixture(scope="module")
def served(llama_folder: str):
    pytest.importorskip("httpx")
    from stagewise.serve import serve_app
    from stagewise.serve._gen_backend import GenerateBackend
    from stagewise.serve._gen_config import GenerateConfig
    from stagewise.serve._gen_routes import create_generate_app

    backend = GenerateBackend(GenerateConfig(model=llama_folder, stages=2, max_seqs=3, max_queue=1,
                                             threads_per_worker=1, heartbeat_timeout_s=3.0))
    try:
        backend.wait_ready(240)
        server = serve_app(create_generate_app(backend))
        yield backend, server.url
        server.stop()
    finally:
        backend.close()


def _post(url: str, path: str, body: dict, **kw):
    import httpx

    return httpx.post(url + path, json=body, timeout=60, **kw)


def _wait_slots_free(backend, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while backend.stats()["slots_used"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert backend.stats()["slots_used"] == 0


def test_served_greedy_matches_hf_for_staggered_requests(served, llama_folder) -> None:
    backend, url = served
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_folder).eval()
    prompts = _prompts(3, (4, 11, 6, 9))  # 3 slots + 1 queue place: all admitted, one waits
    results: dict[int, list[int]] = {}

    def one(i: int) -> None:
        time.sleep(0.03 * i)
        r = _post(url, "/v1/completions", {"model": backend.name, "prompt": prompts[i], "max_tokens": 12,
                                           "temperature": 0})
        assert r.status_code == 200, r.text
        # the character tokenizer maps each generated id to one character (eos is dropped from the text)
        results[i] = [ord(c) for c in r.json()["choices"][0]["text"]]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    eos = model.config.eos_token_id
    for i, p in enumerate(prompts):
        want = [t for t in _hf_greedy(model, p, 12) if t != eos]
        assert results[i] == want, f"prompt {i}"
    _wait_slots_free(backend)


def test_served_sampling_streaming_stop_and_kserve(served) -> None:
    import httpx

    backend, url = served
    body = {"prompt": "hello", "max_tokens": 20, "temperature": 1.5, "top_k": 50, "seed": 1234, "ignore_eos": True}
    first, second = (_post(url, "/v1/completions", body).json() for _ in range(2))
    a, b = first["choices"][0]["text"], second["choices"][0]["text"]
    assert a == b and first["usage"]["completion_tokens"] == 20  # seeded sampling is reproducible
    other = _post(url, "/v1/completions", {**body, "seed": 99}).json()["choices"][0]["text"]
    assert other != a
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == a
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    stop = a[5:8]
    cut = _post(url, "/v1/completions", {**body, "stop": [stop]}).json()["choices"][0]
    assert cut["text"] == a[:a.find(stop)] and cut["finish_reason"] == "stop"
    chat = _post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                                               "temperature": 0}).json()
    assert chat["choices"][0]["message"]["role"] == "assistant" and chat["usage"]["completion_tokens"] <= 5
    k = _post(url, f"/v2/models/{backend.name}/generate",
              {"text_input": "hello", "parameters": {"max_tokens": 20, "temperature": 1.5, "top_k": 50, "seed": 1234,
                                                     "ignore_eos": True}}).json()
    assert k["text_output"] == a and k["model_name"] == backend.name
    with httpx.stream("POST", url + f"/v2/models/{backend.name}/generate_stream",
                      json={"text_input": "hello", "parameters": {**body, "prompt": None}}, timeout=60) as r:
        events = [json.loads(ln.removeprefix("data: ")) for ln in r.iter_lines() if ln]
    assert "".join(e["text_output"] for e in events) == a
    assert _post(url, "/v2/models/nope/generate", {"text_input": "x"}).status_code == 404
    assert _post(url, "/v1/completions", {"prompt": "x", "top_p": 0}).status_code == 400
    models = httpx.get(url + "/v1/models").json()
    assert models["data"][0]["id"] == backend.name
    full = _post(url, "/v1/completions", {**body, "prompt": "abc", "max_tokens": 100}).json()
    assert full["usage"]["completion_tokens"] == 64 - 3 and full["choices"][0]["finish_reason"] == "length"
    stats = httpx.get(url + "/v1/stats").json()
    assert stats["tokens"] >= 100 and stats["ttft_p50_ms"] > 0 and stats["itl_p50_ms"] > 0
    assert stats["kv_bytes"] == 2 * 2 * 3 * (2 * 64 * 16) * 4  # layers x (k, v) x slots x (heads*len*dim) x fp32
    prom = httpx.get(url + "/metrics").text
    assert f'stagewise_generate_tokens_total{{model="{backend.name}"}}' in prom
    assert "# TYPE stagewise_generate_kv_cache_use gauge" in prom
    _wait_slots_free(backend)


def test_served_cancel_frees_cache_and_full_budget_is_429(served) -> None:
    import httpx

    backend, url = served
    long = {"prompt": "abc", "max_tokens": 55, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=long, timeout=60) as r:
        next(r.iter_lines())  # the first token arrived: the sequence holds a slot
        assert backend.stats()["slots_used"] == 1
    _wait_slots_free(backend)  # the client went away: its slot is free again
    pid = next(p.pid for p in backend._procs if p.name.endswith("s1"))
    os.kill(pid, signal.SIGSTOP)  # no token comes back: the request below cannot finish before its client leaves
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json={**long, "stream": False}, timeout=0.5)
        time.sleep(1.0)  # the server notices the client left (it checks 4 times a second)
        tokens = backend.stats()["tokens"]
    finally:
        os.kill(pid, signal.SIGCONT)
    _wait_slots_free(backend)  # its step in flight came back: the slot is free ...
    assert backend.stats()["tokens"] == tokens  # ... and the cancelled sequence made no more tokens
    # Hold every slot: stop stage 1 so no step comes back, fill the 3 slots and the 1 queue place, then one more.
    pid = next(p.pid for p in backend._procs if p.name.endswith("s1"))
    os.kill(pid, signal.SIGSTOP)
    try:
        holders = [threading.Thread(target=_post, args=(url, "/v1/completions", {**long, "stream": False}))
                   for _ in range(4)]
        for t in holders:
            t.start()
        deadline = time.monotonic() + 10
        while (backend.stats()["slots_used"] < 3 or backend.stats()["waiting"] < 1) and time.monotonic() < deadline:
            time.sleep(0.05)
        refused = _post(url, "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    finally:
        os.kill(pid, signal.SIGCONT)
    for t in holders:
        t.join(60)
    _wait_slots_free(backend)


def test_generate_command_streams_to_the_terminal(served, tmp_path) -> None:
    import subprocess

    from cli_run import cli_env

    backend, url = served
    want = _post(url, "/v1/completions", {"prompt": "hey", "max_tokens": 8, "temperature": 0}).json()
    done = subprocess.run(["stagewise", "generate", url, backend.name, "hey", "--max-tokens", "8"],
                          env=cli_env(tmp_path), capture_output=True, timeout=120)  # bytes: keep "\r" as sent
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == want["choices"][0]["text"] + "\n"


def test_openai_client_both_modes(served) -> None:
    openai = pytest.importorskip("openai")
    backend, url = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [backend.name]
    done = client.completions.create(model=backend.name, prompt="hello", max_tokens=10, temperature=0)
    streamed = client.completions.create(model=backend.name, prompt="hello", max_tokens=10, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text
    assert done.usage.prompt_tokens == 5
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model=backend.name, messages=messages, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model=backend.name, messages=messages, max_tokens=8,
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    assert chat.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=1)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_worker_lost_mid_stream_the_stream_completes(served, how: str) -> None:
    """Kill a stage (or stop it: silent past the heartbeat timeout) while a sequence streams: the workers restart,
    the sequence is prefilled again from its tokens so far, and the stream goes on to the undisturbed text."""
    import httpx

    backend, url = served
    body = {"prompt": "abc", "max_tokens": 58, "temperature": 0, "ignore_eos": True}
    want = _post(url, "/v1/completions", body).json()["choices"][0]["text"]
    restarts = backend.restarts
    for _attempt in range(5):
        pid = next(p.pid for p in backend._procs if p.name.endswith("s1"))
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=120) as r:
            lines = r.iter_lines()
            first = next(lines)
            os.kill(pid, signal.SIGSTOP)  # freeze it mid-sequence, then make sure the sequence is still running
            if backend.stats()["slots_used"] == 0:
                os.kill(pid, signal.SIGCONT)
                continue
            if how == "SIGKILL":
                os.kill(pid, signal.SIGKILL)
            rest = [ln for ln in lines if ln]
        break
    else:
        pytest.fail("every sequence finished before its stage could be stopped")
    assert rest[-1] == "data: [DONE]"
    text = "".join(json.loads(ln.removeprefix("data: "))["choices"][0]["text"] for ln in [first, *rest[:-1]])
    assert text == want
    assert backend.restarts == restarts + 1
    _wait_slots_free(backend)


@pytest.mark.parametrize("name", ["bloom", "gemma"])
def test_served_factory_models_match_hf_generate(name: str) -> None:
    """Two more architectures through worker processes (ALiBi without position ids; scaled, tied embeddings), built
    by their factory in every process, prompts as token ids arriving at different times."""
    import asyncio

    from stagewise.serve import GenerateBackend, GenerateConfig

    model = hf.HF_MODELS[name]().model.eval()
    prompts = _prompts(5, (6, 3, 10))
    backend = GenerateBackend(GenerateConfig(model=f"stagewise.zoo.hf:{name}", stages=2, max_seqs=2,
                                             threads_per_worker=1))
    try:
        backend.wait_ready(240)

        async def one(i: int) -> list[int]:
            await asyncio.sleep(0.02 * i)
            params = SamplingParams(max_tokens=10, temperature=0)
            return [ev.token async for ev in backend.generate(prompts[i], params)]

        async def run() -> list[list[int]]:
            return await asyncio.gather(*(one(i) for i in range(len(prompts))))

        got = asyncio.run(run())
    finally:
        backend.close()
    assert got == [_hf_greedy(model, p, 10) for p in prompts]
