"""Take docs/serve.png: the chat page of `minimind-jax serve` in headless Chromium.

    python docs/serve_screenshot.py --out docs/serve.png -- --ckpt demo_out/runs/full_sft_128

Everything after `--` is `minimind-jax serve`'s flags (host and port are chosen here). The
questions are asked one after another in one conversation, at temperature 0.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from minimind_jax import cli  # noqa: E402
from minimind_jax.serve.command import (  # noqa: E402
    build_server_app,
    config_from_args,
    running_server,
)
from tests.serve_fixtures import headless_chromium, send_and_wait  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/serve.png", help="PNG to write")
    parser.add_argument("--question", action="append", help="a question (repeatable)")
    parser.add_argument("--max_tokens", default="96", help="the page's max_tokens")
    parser.add_argument("serve_args", nargs=argparse.REMAINDER, help="-- then serve's flags")
    args = parser.parse_args()
    serve_argv = [a for a in args.serve_args if a != "--"]
    serve_args = cli.build_parser().parse_args(["serve", *serve_argv])
    app, _ = build_server_app(config_from_args(serve_args))
    questions = args.question or [
        "「画蛇添足」是什么意思？", "「对牛弹琴」怎么读？", "「守株待兔」出自哪里？"]
    with running_server(app) as url, headless_chromium(
            shutil.which("chromium"), shutil.which("chromedriver"), size="1000,800") as driver:
        driver.get(url + "/")
        driver.execute_script(
            "for (const [id, v] of [['temperature', '0'], ['max_tokens', arguments[0]]]) {"
            "  const e = document.getElementById(id); e.value = v;"
            "  e.dispatchEvent(new Event('input')); }", args.max_tokens)
        for i, question in enumerate(questions, 1):
            answer = send_and_wait(driver, question, i)
            print(f"Q: {question}\nA: {answer['text']}  [{answer['stats']}]")
        driver.save_screenshot(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
