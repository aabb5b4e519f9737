"""minimind-3's chat template in `generate`/`chat` and `serve`: prompts as transformers renders
minimind-3's template (system, history, thinking, tools), answers' think and tool-call blocks."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from minimind_jax.data.tokenizer import load_tokenizer
from minimind_jax.infer import generate as gen
from minimind_jax.infer.reply_text import (
    parse_tool_calls,
    safe_length,
    split_opened_thinking,
    split_thinking,
)
from minimind_jax.model.config import arch_defaults
from tests.helpers import (
    MINIMIND3_TOKENIZER_DIR,
    TOKENIZER_DIR,
    answer_by_hf_tokenizers,
    greedy_by_recomputation,
)

TINY_MINIMIND3 = arch_defaults("minimind3").replace(dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                           max_seq_len=512)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "城市天气 <now> & \"quotes\"",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "now", "description": "current time",
                                          "parameters": {"type": "object", "properties": {}}}}
CALLED = {"role": "assistant", "content": "", "tool_calls": [
    {"id": "call_1", "type": "function",
     "function": {"name": "get_weather", "arguments": "{\"city\": \"北京\"}"}},
    {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": {}}}]}
TOOL_CONVERSATIONS = [  # (messages, tools)
    ([{"role": "user", "content": "北京天气？"}], [WEATHER]),
    ([{"role": "system", "content": "你是助手"}, {"role": "user", "content": "几点了"}],
     [WEATHER, CLOCK]),
    ([{"role": "user", "content": "北京天气和时间？"}, CALLED,
      {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 20}"},
      {"role": "tool", "tool_call_id": "call_2", "content": "12:00"}], [WEATHER, CLOCK]),
]


@pytest.fixture(scope="module")
def minimind3_tok():
    return load_tokenizer(MINIMIND3_TOKENIZER_DIR)


@pytest.fixture(scope="module")
def formats():
    """serve.chat_format (the server's; needs pydantic, which the serve extra brings)."""
    pytest.importorskip("pydantic")
    from minimind_jax.serve import chat_format

    return chat_format


@pytest.fixture(scope="module")
def minimind3_hf():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(MINIMIND3_TOKENIZER_DIR))


def hf_ids(hf, messages, **kwargs) -> list[int]:
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_generate_prompts_equal_transformers(minimind3_tok, minimind3_hf):
    """`generate`/`chat` prompts (system, history with and without reasoning, --think) have
    the ids transformers gives minimind-3's template, ending in its generation prompt."""
    history = [{"role": "user", "content": "你好"},
               {"role": "assistant", "content": "<think>\n打个招呼\n</think>\n\n你好！"},
               {"role": "user", "content": "1+1?"},
               {"role": "assistant", "content": "想一想\n</think>\n\n2"}]  # as --think returns it
    cases = [("你是谁", None, [], False), ("你是谁", "你是MiniMind", [], False),
             ("再见", None, history, False), ("再见", "简短回答", history, True)]
    for text, system, past, think in cases:
        ids = gen.encode_prompt(minimind3_tok, text, True, system, past, think)
        messages = ([{"role": "system", "content": system}] if system else []) + past + [
            {"role": "user", "content": text}]
        assert ids == hf_ids(minimind3_hf, messages, open_thinking=think), (text, system, think)
        tail = "<|im_start|>assistant\n<think>\n" + ("" if think else "\n</think>\n\n")
        assert minimind3_tok.decode(ids).endswith(tail)
    # generation stops there
    assert minimind3_tok.eos_id == 2 and minimind3_tok.eos_token == "<|im_end|>"
    # minimind-3's bos + text
    assert gen.encode_prompt(minimind3_tok, "床前", False) == [1] + minimind3_tok.encode("床前")


def test_tool_prompts_equal_transformers(minimind3_tok, minimind3_hf, formats):
    """The server's prompt for requests with `tools`, assistant `tool_calls` and `tool`
    results: the ids transformers gives minimind-3's template with the same tools."""
    from minimind_jax.serve.schema import parse_request

    ToolChatFormat, chat_format_for = formats.ToolChatFormat, formats.chat_format_for
    chat_format = chat_format_for(minimind3_tok)
    assert isinstance(chat_format, ToolChatFormat)
    for messages, tools in TOOL_CONVERSATIONS:
        request = parse_request(json.dumps({"messages": messages, "tools": tools}).encode())
        ids = chat_format.prompt_ids(request)
        assert ids == hf_ids(minimind3_hf, messages, tools=tools), messages
        assert "# Tools" in minimind3_tok.decode(ids)
    assert not isinstance(chat_format_for(load_tokenizer(TOKENIZER_DIR)), ToolChatFormat)


def test_think_and_tool_call_blocks_in_answers():
    assert split_thinking("<think>\n嗯\n</think>\n\n答案") == ("嗯", "答案")
    assert split_thinking("推理\n</think>\n\n答案") == ("推理", "答案")  # opened by the prompt
    assert split_thinking("just text") == (None, "just text")
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
    text, calls = parse_tool_calls("好的。\n" + call + "\n" + call.replace("北京", "上海"))
    assert text == "好的。\n\n"
    assert calls == [{"name": "get_weather", "arguments": '{"city": "北京"}'},
                     {"name": "get_weather", "arguments": '{"city": "上海"}'}]
    assert parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'
                            )[1] == [{"name": "f", "arguments": '{"a": 1}'}]  # already a string
    assert parse_tool_calls('<tool_call>{"name": "f"}</tool_call>')[1] == [
        {"name": "f", "arguments": "{}"}]
    for malformed in ('<tool_call>{"name": "f", "arguments": {</tool_call>',  # bad JSON
                      '<tool_call>{"arguments": {}}</tool_call>',  # no name
                      '<tool_call>["f"]</tool_call>', '<tool_call>{"name": "f"}'):  # unclosed
        assert parse_tool_calls("x" + malformed) == ("x" + malformed, [])
    mixed = f'<tool_call>oops</tool_call>{call}'
    assert parse_tool_calls(mixed) == ("<tool_call>oops</tool_call>",
                                       [{"name": "get_weather",
                                         "arguments": '{"city": "北京"}'}])
    assert [safe_length(t, "<tool_call>") for t in ("abc", "abc<tool", "ab<tool_call>{", "a<",
                                                    "<t>")] == [3, 3, 2, 1, 3]
    assert split_opened_thinking("想\n</think>\n\n答") == ("想\n", "答", True)
    assert split_opened_thinking("还在想") == ("还在想", "", False)


def test_reply_builder_returns_openai_tool_calls(minimind3_tok, formats):
    ChatFormat, ToolChatFormat = formats.ChatFormat, formats.ToolChatFormat
    text = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
            '\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')
    message, reason = ToolChatFormat(minimind3_tok).reply(text)
    assert reason == "tool_calls" and message["content"] is None
    assert [c["function"] for c in message["tool_calls"]] == [
        {"name": "get_weather", "arguments": '{"city": "北京"}'},
        {"name": "now", "arguments": "{}"}]
    ids = [c["id"] for c in message["tool_calls"]]
    assert all(i.startswith("call_") for i in ids) and len(set(ids)) == 2
    assert all(c["type"] == "function" for c in message["tool_calls"])
    malformed = '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>'
    assert ToolChatFormat(minimind3_tok).reply(malformed) == (
        {"role": "assistant", "content": malformed}, None)
    assert ChatFormat(minimind3_tok).reply(text) == ({"role": "assistant", "content": text}, None)
    openai = pytest.importorskip("openai")
    parsed = openai.types.chat.ChatCompletionMessage.model_validate(message)
    assert parsed.tool_calls[0].function.name == "get_weather"


class _FinishedCompletion:
    def cancel(self):
        pass


def _stream(tokenizer, chat_format, text: str, thinking: bool = False) -> list[dict]:
    """The chunks `_sse` sends for an answer whose tokens are those of `text`."""
    pytest.importorskip("fastapi")
    from minimind_jax.serve.app import _sse
    from minimind_jax.serve.chat_format import ReplyStream
    from minimind_jax.serve.choices import Choice

    async def run():
        events = asyncio.Queue()
        for token in tokenizer.encode(text):  # the engine sends no EOS token
            events.put_nowait((0, ("token", token)))
        events.put_nowait((0, ("end", "stop")))
        meta = {"id": "chatcmpl-x", "created": 0, "model": "tiny"}
        choice = Choice(0, _FinishedCompletion(), tokenizer, ReplyStream(chat_format, thinking))
        return [piece async for piece in _sse(meta, [choice], events, 5, False)]

    pieces = asyncio.run(run())
    assert pieces[-1] == "data: [DONE]\n\n"
    chunks = [json.loads(p[len("data: "):]) for p in pieces[:-1]]
    openai = pytest.importorskip("openai")
    for chunk in chunks:  # OpenAI's chunk schema, tool-call deltas included
        openai.types.chat.ChatCompletionChunk.model_validate(chunk)
    return chunks


def test_streamed_tool_calls_come_as_deltas_not_text(minimind3_tok, formats):
    ToolChatFormat = formats.ToolChatFormat
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
    chunks = _stream(minimind3_tok, ToolChatFormat(minimind3_tok),
                     "我查一下。\n" + call + "\n" + call)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    content = "".join(d.get("content") or "" for d in deltas)
    assert content == "我查一下。\n" and "<tool_call>" not in content
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert [c["index"] for c in calls] == [0, 1]
    assert all(c["function"] == {"name": "get_weather", "arguments": '{"city": "北京"}'}
               and c["type"] == "function" and c["id"] for c in calls)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # malformed: everything arrives as text, finish_reason from the decoder
    malformed = "看看<tool_call>{oops}</tool_call>完"
    chunks = _stream(minimind3_tok, ToolChatFormat(minimind3_tok), malformed)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content") or "" for d in deltas) == malformed
    assert not any("tool_calls" in d for d in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_thinking_requests_render_and_answer_as_minimind3s_server(minimind3_tok, minimind3_hf,
                                                                  formats):
    """`chat_template_kwargs.enable_thinking` (or `open_thinking`) opens the think block as
    transformers renders it; the reasoning comes back as `reasoning_content`, streamed apart
    from the content; MiniMind2's template has no such switch."""
    from minimind_jax.serve.schema import ApiError, parse_request

    ChatFormat, chat_format_for = formats.ChatFormat, formats.chat_format_for
    messages = [{"role": "user", "content": "北京天气？"}]
    for body in ({"open_thinking": True}, {"chat_template_kwargs": {"enable_thinking": True}},
                 {"chat_template_kwargs": {"open_thinking": True}, "tools": [WEATHER]}):
        request = parse_request(json.dumps({"messages": messages, **body}).encode())
        assert request.thinking
        assert chat_format_for(minimind3_tok).prompt_ids(request) == hf_ids(
            minimind3_hf, messages, open_thinking=True, tools=body.get("tools"))
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
    text = "先查天气。\n</think>\n\n" + call
    message, reason = chat_format_for(minimind3_tok).reply(text, thinking=True)
    assert (message["reasoning_content"], message["content"], reason) == (
        "先查天气。", None, "tool_calls")
    chunks = _stream(minimind3_tok, chat_format_for(minimind3_tok),
                     "先想想，再答\n</think>\n\n答案是2", True)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    assert (reasoning, content) == ("先想想，再答\n", "答案是2")
    assert sum(1 for d in deltas if d.get("reasoning_content")) > 1  # streamed, not at the end
    request = parse_request(json.dumps({"messages": messages, "open_thinking": True}).encode())
    with pytest.raises(ApiError, match="thinking"):
        ChatFormat(load_tokenizer(TOKENIZER_DIR)).prompt_ids(request)


@pytest.fixture(scope="module")
def minimind3_params():
    from tests.serve_fixtures import tiny_model

    # N(0, 0.02) init: sharper, or it says "\n"
    return tiny_model(config=TINY_MINIMIND3, scale=16.0)


def test_live_server_takes_tools_with_the_minimind3_template(minimind3_params):
    """The openai client sends `tools` (and a history with tool calls and results) to a
    minimind-3 model: 200 and a well-formed answer, streamed and not."""
    pytest.importorskip("uvicorn")
    openai = pytest.importorskip("openai")
    from tests.serve_fixtures import API_KEY, live_server

    messages = [{"role": "user", "content": "北京天气？"}, CALLED,
                {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 20}"},
                {"role": "tool", "tool_call_id": "call_2", "content": "12:00"}]
    with live_server(minimind3_params, config=TINY_MINIMIND3, tokenizer_dir=MINIMIND3_TOKENIZER_DIR,
                     max_context=512) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0,
                               timeout=120)
        kwargs = dict(model="tiny", messages=messages, tools=[WEATHER, CLOCK],
                      temperature=0, max_tokens=8)
        reply = client.chat.completions.create(**kwargs)
        choice = reply.choices[0]
        assert choice.finish_reason in ("stop", "length", "tool_calls")
        assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
        minimind3_tok = load_tokenizer(MINIMIND3_TOKENIZER_DIR)  # the tools reached the template:
        rendered = minimind3_tok.apply_chat_template(messages, add_generation_prompt=True,
                                            tools=[WEATHER, CLOCK])
        assert reply.usage.prompt_tokens == len(minimind3_tok.encode(rendered)) > 250
        pieces = [c.choices[0].delta.content or "" for c in
                  client.chat.completions.create(**kwargs, stream=True) if c.choices]
        assert "".join(pieces) == choice.message.content  # greedy: the same answer
        thinking = dict(kwargs, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
        message = client.chat.completions.create(**thinking).choices[0].message
        deltas = [c.choices[0].delta for c in
                  client.chat.completions.create(**thinking, stream=True) if c.choices]
        streamed = ["".join(getattr(d, key, None) or "" for d in deltas)
                    for key in ("reasoning_content", "content")]
        assert message.reasoning_content  # 8 tokens, no </think>: all reasoning
        assert [streamed[0].strip(), streamed[1]] == [message.reasoning_content,
                                                      message.content]


def test_generate_command_with_a_minimind3_model(minimind3_params, minimind3_tok, tmp_path,
                                                capsys):
    """`generate` on a minimind-3 weights file with its tokenizer prints the text of the greedy
    tokens of a full recomputation per token (no cache): without --think as the answer, with
    --think (the prompt opened the block, and no </think> came) as the thinking; --think on
    MiniMind2's template is a user error."""
    from minimind_jax import cli
    from minimind_jax.model import weights

    path = tmp_path / "full_sft_64.npz"
    np.savez(path, **weights.state_dict_from_params(minimind3_params, TINY_MINIMIND3))
    base = ["generate", "--ckpt", str(path), "--tokenizer", str(MINIMIND3_TOKENIZER_DIR),
            "--n_heads", "4", "--temperature", "0", "--max_new_tokens", "4", "--prompt", "你好",
            "--dtype", "float32"]
    for extra, think in (([], False), (["--think", "--system", "简短回答"], True)):
        assert cli.main(base + extra) == 0
        prompt = gen.encode_prompt(minimind3_tok, "你好", True, "简短回答" if think else None,
                                   think=think)
        new = greedy_by_recomputation(minimind3_params, TINY_MINIMIND3, prompt, 4,
                                      eos_id=minimind3_tok.eos_id)
        text = answer_by_hf_tokenizers(MINIMIND3_TOKENIZER_DIR, new, minimind3_tok.eos_id)
        assert text.strip() and "</think>" not in text  # else the answer/thinking split differs
        shown = f"thinking: {text}\nanswer: \n" if think else f"answer: {text}\n"
        assert capsys.readouterr().out == f"prompt: 你好\n{shown}\n"
    assert cli.main(base[:4] + [str(TOKENIZER_DIR)] + base[5:] + ["--think"]) == 2
    assert "--think needs" in capsys.readouterr().err
