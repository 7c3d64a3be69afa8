"""`llmkit agent run "task" (--model DIR | --base-url URL) ...` and `llmkit agent trace FILE` (docs/agents.md)."""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="run a tool-using agent on a task; show an agent trace")
    ps = p.add_subparsers(dest="agent_command", metavar="SUBCOMMAND", required=True)

    q = ps.add_parser("run", help="work on a task with tools until the model answers (or --max-steps)")
    q.add_argument("task", help="what to do, e.g. 'What is 1234 * 5678?'")
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", default=None, help="model folder, run with llmkit's generation loop")
    g.add_argument("--base-url", default=None, help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1")
    q.add_argument("--served-model", default=None, help="model id at --base-url (default: the first listed)")
    q.add_argument("--api-key", default=None, help="API key for --base-url")
    q.add_argument("--tools", default="calculator",
                   help="comma-separated built-in tools: calculator,python,rag,read_file,write_file,remember,recall "
                        "(default: calculator; '' for none)")
    q.add_argument("--mcp", action="append", default=[], metavar="CMD",
                   help="start an MCP server with this command line (stdio) and add its tools (repeatable)")
    q.add_argument("--max-steps", type=int, default=8, help="model calls before giving up (default 8)")
    q.add_argument("--tool-timeout", type=float, default=30.0, help="seconds a tool call may take (default 30)")
    q.add_argument("--loop", choices=["auto", "native", "react"], default="auto",
                   help="native function calling or ReAct text (default: native when the model supports tools)")
    q.add_argument("--trace", default=None, metavar="FILE", help="write every step to this JSONL file")
    q.add_argument("--workspace", default=None, metavar="DIR", help="the folder read_file / write_file may touch")
    q.add_argument("--rag-store", default=None, metavar="STORE", help="the rag tool's store (`llmkit rag index`)")
    q.add_argument("--memory", default=None, metavar="DIR",
                   help="long-term memory folder: recalled facts go into the prompt, answers are stored")
    q.add_argument("--memory-store", default=None, metavar="STORE",
                   help="long-term memory in a RAG store instead (a folder or postgresql:// URI; MiniLM embeddings)")
    q.add_argument("--context-budget", type=int, default=None, metavar="TOKENS",
                   help="summarise old turns with the model when the conversation grows past this")
    q.add_argument("--system", default=None, help="a system message")
    q.add_argument("--max-tokens", type=int, default=256, help="tokens per model reply (default 256)")
    q.add_argument("--temperature", type=float, default=0.0)
    q.add_argument("--json", action="store_true", help="print the result as one JSON object")
    q.add_argument("--verbose", "-v", action="store_true", help="print the trace (to stderr) before the answer")
    q.set_defaults(func=run_agent)

    q = ps.add_parser("trace", help="show an agent trace (JSONL) readably")
    q.add_argument("file")
    q.add_argument("--prompts", action="store_true", help="also print the prompt messages of each step")
    q.set_defaults(func=run_trace)


def run_agent(args) -> int:
    from contextlib import ExitStack

    from llmkit.agent import Agent
    from llmkit.agent.builtin import builtin_tools
    from llmkit.agent.memory import LongTermMemory
    from llmkit.agent.trace import format_trace

    names = [n.strip() for n in args.tools.split(",") if n.strip()]
    with ExitStack() as stack:
        search = None
        if "rag" in names:
            if args.rag_store is None:
                from llmkit.errors import InputError

                raise InputError("--tools rag needs --rag-store STORE (a store built with `llmkit rag index`)")
            from llmkit.rag import Index

            index = stack.enter_context(Index(args.rag_store))
            index.store()  # a missing store fails now, not at the first tool call

            def search(q: str, k: int) -> list[dict]:
                return [h.to_dict() for h in index.query(q, k)]

        if args.memory and args.memory_store:
            from llmkit.errors import InputError

            raise InputError("use one of --memory DIR (a simple embedded store) and --memory-store STORE (RAG)")
        memory = LongTermMemory(args.memory) if args.memory else None
        if args.memory_store:
            from llmkit.rag.memory import StoreMemory

            memory = StoreMemory(args.memory_store)
            stack.callback(memory.close)
        tools = builtin_tools(names, workspace=args.workspace, rag=search, memory=memory)
        for cmd in args.mcp:
            from llmkit.agent.mcp import MCPTools

            tools += stack.enter_context(MCPTools(cmd, timeout=args.tool_timeout)).tools
        agent = Agent(args.model or args.base_url, tools, loop=args.loop, max_steps=args.max_steps,
                      tool_timeout=args.tool_timeout, system=args.system, trace=args.trace,
                      context_budget=args.context_budget, memory=memory, max_tokens=args.max_tokens,
                      temperature=args.temperature, served_model=args.served_model, api_key=args.api_key)
        result = agent.run(args.task)
    if args.json:
        from llmkit.agent.agent import result_json

        print(result_json(result))
    else:
        if args.verbose:
            print(format_trace(result.trace), file=sys.stderr)
        print(result.answer if result.answer is not None else "")
        if result.stopped != "answer":
            print(f"llmkit agent: no answer within --max-steps {args.max_steps}", file=sys.stderr)
    return 0 if result.stopped == "answer" else 1


def run_trace(args) -> int:
    from llmkit.agent.trace import format_trace

    print(format_trace(args.file, show_prompts=args.prompts))
    return 0
