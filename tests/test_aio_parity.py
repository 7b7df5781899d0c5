"""corral.aio and the trio facade expose the same methods (issue 22 item 4).

`corral.aio.Runtime` is generated from `corral.runtime.Runtime`'s public members; these
tests check that the generated surface and the typed declarations (for type checkers)
match the trio facade, name by name and parameter by parameter, modulo sync/async and
the asyncio streams, and that `n` choices work through asyncio.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
from pathlib import Path
from typing import Any

import pytest

from corral import aio
from corral.aio.runtime import surface
from corral.config import config_from_mapping
from corral.protocol.errors import Code, EngineClientError
from corral.protocol.messages import Completion, GenerateParams
from corral.runtime import Runtime as TrioRuntime

SRC = Path(__file__).resolve().parent.parent / "src" / "corral"
ONLY_AIO = {"run_in_trio"}  # the way into the guest trio run: asyncio's only
STREAMS = {"TokenStream", "ChoiceStreams"}
PROMPT = "The quick brown fox"


def _public(cls: type) -> set[str]:
    return {name for name in vars(cls) if not name.startswith("_")}


def _class_body(path: Path, name: str) -> list[ast.stmt]:
    tree = ast.parse(path.read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name]
    return cls.body


def _functions(body: list[ast.stmt]) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
    return {n.name: n for n in body
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
            and not n.name.startswith("_")}


def _decorators(node: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    return {ast.unparse(d) for d in node.decorator_list}


def _expected(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """The asyncio declaration a trio facade member calls for, as one line."""
    args, returns = ast.unparse(node.args), ast.unparse(node.returns or ast.Constant(None))
    if "property" in _decorators(node):
        return f"@property def {node.name}({args}) -> {returns}"
    stream = node.returns
    if (isinstance(stream, ast.Subscript)
            and ast.unparse(stream.value) in ("AsyncIterator", "AbstractAsyncContextManager")
            and ast.unparse(stream.slice) in STREAMS):
        return f"def {node.name}({args}) -> {ast.unparse(stream.slice)}"
    return f"async def {node.name}({args}) -> {returns}"


def _declared(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    args, returns = ast.unparse(node.args), ast.unparse(node.returns or ast.Constant(None))
    prefix = ("@property " if "property" in _decorators(node) else "") + (
        "async " if isinstance(node, ast.AsyncFunctionDef) else "")
    return f"{prefix}def {node.name}({args}) -> {returns}"


def _aio_declarations() -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
    (checking,) = [n for n in _class_body(SRC / "aio" / "runtime.py", "Runtime")
                   if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]
    return _functions(checking.body)


def test_the_aio_runtime_has_every_method_of_the_trio_facade_and_no_other() -> None:
    assert _public(aio.Runtime) - ONLY_AIO == _public(TrioRuntime)
    assert {m.name for m in surface()} == _public(TrioRuntime)


def test_each_generated_method_takes_what_the_trio_method_takes() -> None:
    for member in surface():
        ours = inspect.getattr_static(aio.Runtime, member.name)
        if member.kind == "property":
            assert isinstance(ours, property), member.name
            continue
        assert inspect.signature(ours) == inspect.signature(member.value), member.name
        # A stream opens in `async with`; everything else is awaited.
        assert inspect.iscoroutinefunction(ours) is (member.kind != "stream"), member.name
        assert ours.__doc__ == member.value.__doc__


def test_the_streams_are_the_asyncio_streams() -> None:
    adapters = {m.name: m.adapter for m in surface() if m.kind == "stream"}
    assert adapters == {"generate": aio.TokenStream, "stream": aio.TokenStream,
                        "generate_choices": aio.ChoiceStreams, "choices": aio.ChoiceStreams}


def test_the_typed_declarations_match_the_trio_facade() -> None:
    trio_members = _functions(_class_body(SRC / "runtime" / "facade.py", "Runtime"))
    declared = _aio_declarations()
    expected = {name: _expected(node) for name, node in trio_members.items()}
    missing = sorted(set(expected) - set(declared))
    assert not missing, (
        "declare these in corral.aio.Runtime's TYPE_CHECKING block (the methods "
        "themselves are generated already):\n" + "\n".join(expected[n] for n in missing))
    assert not set(declared) - set(expected), "declared, but not on the trio facade"
    for name, node in declared.items():
        assert _declared(node) == expected[name]


# -- n choices through asyncio ----------------------------------------------------------


def test_n_choices_through_aio_are_the_trio_facades(model_path: str) -> None:
    sampling: dict[str, Any] = {"max_tokens": 8, "temperature": 1.0, "seed": 7}

    async def body() -> None:
        config = config_from_mapping({"stream_registry": {"max_active_streams": 8}})
        async with aio.open_runtime(config, models={"tiny": model_path}) as rt:
            reference: Completion = await rt.run_in_trio(
                lambda trio_rt: trio_rt.complete("tiny", PROMPT, n=3, **sampling))
            assert len({tuple(c.token_ids) for c in reference.choices}) == 3  # they differ

            completed = await rt.complete("tiny", PROMPT, n=3, **sampling)
            assert [c.text for c in completed.choices] == \
                [c.text for c in reference.choices]

            request = GenerateParams(model="tiny", prompt=PROMPT, n=3, **sampling)
            ran = await rt.run(request)
            assert [c.token_ids for c in ran.choices] == \
                [c.token_ids for c in reference.choices]

            for opened in (rt.generate_choices("tiny", PROMPT, n=3, **sampling),
                           rt.choices(request)):
                assert isinstance(opened, aio.ChoiceStreams)
                ids: list[list[int]] = [[], [], []]
                ends: list[str | None] = [None, None, None]
                async with opened as choices:
                    async for chunk in choices:
                        ids[chunk.choice].extend(chunk.token_ids)
                        if chunk.finish_reason is not None:
                            ends[chunk.choice] = chunk.finish_reason
                    assert choices.usage == reference.usage
                    assert [s.text for s in choices.streams] == \
                        [c.text for c in reference.choices]
                assert ids == [c.token_ids for c in reference.choices]
                assert ends == [c.finish_reason for c in reference.choices]

            async with rt.stream(GenerateParams(model="tiny", prompt=PROMPT,
                                                **sampling)) as stream:
                one = [i async for chunk in stream for i in chunk.token_ids]
            assert one == reference.choices[0].token_ids  # choice 0 is what n=1 gives

    asyncio.run(body())


def test_choices_raise_the_trio_facades_typed_errors_through_aio(model_path: str) -> None:
    async def body() -> None:
        async with aio.open_runtime(models={"tiny": model_path}) as rt:
            with pytest.raises(EngineClientError) as caught:
                async with rt.generate_choices("tiny", PROMPT, n=2, max_tokens=4,
                                               generated=[1]):
                    pass
            assert caught.value.code is Code.INVALID_PARAMS
            assert caught.value.details["field"] == "generated"
            with pytest.raises(EngineClientError) as caught:
                await rt.complete("tiny", PROMPT, n=99)
            assert caught.value.details["field"] == "n"
            assert (await rt.statistics()).registry.active == 0

    asyncio.run(body())
