"""Offline policy tools: validate, trace, test. They read files and need no agent."""
from __future__ import annotations

import sys

import click

from ..l7.rules import http_request
from ..policy.api.loader import load_data_file, load_files
from ..policy.compiler import ENFORCEMENT_MODES
from ..policy.sel import parse_port, parse_sel
from ..policy.testing import load_cases, run_cases
from ..policy.trace import Tracer
from .common import emit_json, handle_errors, output_option, policy_sources

files_arg = click.argument("files", nargs=-1, required=True, type=click.Path(allow_dash=True))
enforcement_option = click.option("--enforcement", type=click.Choice(ENFORCEMENT_MODES),
                                  default="default", show_default=True)


@click.command("validate")
@files_arg
@click.option("--services", "services_file", type=click.Path(dir_okay=False, exists=True),
              help="YAML/JSON stockade_services mapping: warn about selectors no service matches.")
@click.option("--workloads", "workloads_file", type=click.Path(dir_okay=False, exists=True),
              help="YAML/JSON list of known workloads' labels (or `endpoint list -o json` output).")
@output_option
@handle_errors
def validate(files, services_file, workloads_file, output):
    """Check policy FILES (YAML or JSON, several documents each): a directory gives its
    .yaml, .yml and .json files, `-` reads standard input.

    With --services and/or --workloads, also warn about selectors that match no
    defined service and no known workload (warnings do not fail validation).

    \b
    Examples:
      stockade policy validate policies/*.yaml
      stockade policy validate policies/
      stockade policy get db -o yaml | stockade policy validate -
      stockade policy validate -o json web.yaml
      stockade policy validate --services services.yaml --workloads seen.json policies/*.yaml
    """
    sources = policy_sources(files)
    policies = load_sources(sources)
    files = sources
    warnings = []
    if services_file or workloads_file:
        from ..policy.lint import service_label_sets, unmatched_selectors, workload_label_sets
        services = (_read_data(services_file) or {}) if services_file else {}
        sets = service_label_sets(services)
        sets += workload_label_sets(_read_data(workloads_file) if workloads_file else [])
        warnings = unmatched_selectors(policies, sets, set(services) if services_file else None)
    if output == "json":
        emit_json({"valid": True, "warnings": warnings, "policies": [
            {**p.ref.to_dict(), "source": p.source, "specs": len(p.rules)} for p in policies]})
    else:
        click.echo(f"{len(policies)} policies in {len(files)} files are valid")
        for p in policies:
            click.echo(f"  {p.ref.kind} {p.ref.display} ({p.source})")
        for w in warnings:
            click.echo(f"warning: {w}", err=True)


def load_sources(sources) -> list:
    """policy_sources() output as one set: every error, or the policies."""
    from ..errors import PolicyError, PolicyErrors
    from ..policy.api.loader import load_text
    paths = [s for s in sources if not isinstance(s, dict)]
    errors: list[PolicyError] = []
    policies: list = []
    try:
        policies = load_files(paths) if paths else []
    except PolicyErrors as exc:
        errors.extend(exc.errors)
    for s in sources:
        if isinstance(s, dict):
            try:
                policies.extend(load_text(s["text"], s["name"]))
            except PolicyErrors as exc:
                errors.extend(exc.errors)
    if errors:
        raise PolicyErrors(errors)
    return policies


def _read_data(path: str):
    return load_data_file(path)


@click.command("trace")
@click.option("--src", required=True,
              help="Source: k=v,... labels, cidr:<prefix>, entity:<name> (live: endpoint:<name>).")
@click.option("--dst", required=True, help="Destination, as --src.")
@click.option("--dport", required=True, help="Destination port/protocol: 80/tcp, 53/udp, 8/icmp.")
@click.option("--live", is_flag=True,
              help="Ask the agent: its loaded policies and identities (no FILES).")
@click.option("--socket", "socket_path", default=None, envvar="STOCKADE_SOCKET",
              help="The agent's API socket, with --live [/run/stockade/agent.sock].")
@click.option("--http-method", metavar="METHOD",
              help="Trace one HTTP request on the connection too (by the HTTP rules its "
              "proxy enforces): its method [GET].")
@click.option("--http-path", metavar="PATH", help="The request's target, path and query [/].")
@click.option("--http-host", metavar="HOST", help="The request's Host header [none].")
@click.option("--http-header", metavar="'NAME: VALUE'", multiple=True,
              help="A header of the request (repeat for several).")
@enforcement_option
@click.argument("files", nargs=-1, type=click.Path(allow_dash=True))
@output_option
@handle_errors
def trace(src, dst, dport, live, socket_path, http_method, http_path, http_host, http_header,
          enforcement, files, output):
    """Show what the policy in FILES (or, with --live, the agent's) does with one
    connection, and why. Both answer from the same engine, in the same JSON shape.

    A verdict of deny still exits 0; exit 1 means invalid input.

    \b
    Examples:
      stockade policy trace --src app=web --dst app=db --dport 5432/tcp policies/*.yaml
      stockade policy trace --src cidr:203.0.113.0/24 --dst app=web --dport 443/tcp p.yaml
      stockade policy trace --live --src endpoint:web1 --dst app=db --dport 5432/tcp
      stockade policy trace --src app=web --dst app=api --dport 8080/tcp \\
          --http-method GET --http-path /api/x policies/*.yaml
    """
    if live:
        if files:
            raise click.UsageError("--live asks the agent: give no FILES")
        from .agent_cmds import make_client
        with make_client(socket_path) as c:
            result = c.trace(src, dst, dport, http_method=http_method, http_path=http_path,
                             http_host=http_host, http_header=http_header)
    else:
        if not files:
            raise click.UsageError("give policy FILES, or --live to ask the agent")
        policies = load_sources(policy_sources(files))
        s, d = parse_sel(src), parse_sel(dst)
        proto, port = parse_port(dport)
        try:
            http = http_request(http_method, http_path, http_host, http_header)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        result = Tracer(policies, enforcement).trace(s, d, proto, port, http)
    if output == "json":
        emit_json(result)
        return
    echo_trace(result)


def echo_trace(result: dict) -> None:
    """The trace in words (the JSON shape is Tracer.trace's)."""
    click.echo(f"{result['src']['selector']} -> {result['dst']['selector']} {result['port']}")
    if result.get("parts"):
        click.echo("  the prefix is split by the policies' own prefixes:")
        for part in result["parts"]:
            click.echo(f"  {_part_words(part)}: {part['verdict'].upper()} ({part['reason']})")
        if result["verdict"] == "partial":
            allowed = [p for p in result["parts"] if p["verdict"] == "allow"]
            click.echo(f"Final verdict: PARTIAL ({len(allowed)} of {len(result['parts'])} "
                       "parts allowed, the others denied)")
        else:
            click.echo(f"Final verdict: {result['verdict'].upper()} (every part)")
        return
    for side, who in (("egress", "source"), ("ingress", "destination")):
        r = result[side]
        click.echo(f"  {side} of {who}: {r['verdict'].upper()} ({r['reason']})")
        for rule in r["rules"]:
            click.echo(f"    {rule['verdict']}: {rule['policy']} {rule['rule']}")
        if r["policies"] and not r["rules"]:
            click.echo(f"    policies: {', '.join(r['policies'])}")
        http = r.get("http")
        if http and http["enforced"]:
            for rule in http["rules"]:
                mark = "matched" if rule == http.get("matched") else "http"
                click.echo(f"    {mark}: {_http_words(rule)}")
    click.echo(f"Final verdict: {result['verdict'].upper()}")


def _http_words(rule: dict) -> str:
    parts = [f"{k} {rule[k]}" for k in ("method", "path", "host") if k in rule]
    parts += [f"header {h}" for h in rule.get("headers", [])]
    return ", ".join(parts) or "any request (visibility only)"


def _part_words(part: dict) -> str:
    text = f"cidr:{part['cidr']}"
    if part.get("except"):
        text += f" except {', '.join(part['except'])}"
    return text


@click.command("test")
@click.argument("tests", type=click.Path(dir_okay=False))
@enforcement_option
@files_arg
@output_option
@handle_errors
def test(tests, enforcement, files, output):
    """Check the expectations in TESTS (a YAML list of {from, to, port, expect}; a case
    on a TCP port may add one HTTP request, http: {method, path, host, headers}, checked
    against the port's HTTP rules too) against policy FILES. Exits 1 if any case fails.

    \b
    Example:
      stockade policy test inventories/demo/policy_tests.yaml inventories/demo/policies/*.yaml
    """
    policies = load_sources(policy_sources(files))
    results = run_cases(load_cases(tests), policies, enforcement)
    failed = [r for r in results if not r["passed"]]
    if output == "json":
        emit_json({"passed": len(results) - len(failed), "failed": len(failed), "results": results})
    else:
        for r in results:
            mark = "PASS" if r["passed"] else "FAIL"
            req = r.get("http")
            what = f" {req['method']} {req['path']}" if req else ""
            line = (f"{mark}  {r['from']} -> {r['to']} {r['port']}{what}: "
                    f"expected {r['expect']}, got {r['got']}")
            click.echo(click.style(line, fg=None if r["passed"] else "red"))
            if not r["passed"]:
                for side in ("egress", "ingress"):
                    t = r["trace"][side]
                    click.echo(f"      {side}: {t['verdict']} ({t['reason']}) {', '.join(t['policies'])}")
        click.echo(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if failed:
        sys.exit(1)
