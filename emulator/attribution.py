"""Which line of the user's rules file decided a traced packet, and the rule that would admit it.

Structure only, never rule matching: the file is indexed chain by chain (rule statements in order,
with their lines), `nft -j -a list ruleset` lists each loaded chain's rules in order with their
handles, and the two are zipped by position (iptables-nft loads one nft rule per `-A` line). Where
positions cannot be trusted (counts differ, rules placed by handle), a rule is named without a line.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from emulator.errors import LabError
from emulator.rules import Ruleset
from emulator.trace import TRACE_TABLE_NAME, Decision, DecisionKind

FAMILIES = ("ip", "ip6", "inet", "arp", "bridge", "netdev")
_IPTABLES_HOOKS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
_IPTABLES_COMMANDS = {"-A": "append", "--append": "append", "-I": "insert", "--insert": "insert",
                      "-N": "new", "--new-chain": "new", "-P": "policy", "--policy": "policy"}
_NFT_TOKEN = re.compile(r'"[^"\n]*"|#[^\n]*|\\\n|[{};\n]|[^"#{};\n\\]+|.')
_NFT_POSITIONED = re.compile(r"(?:position|index|handle) \d+\b")

ChainKey = tuple[str, str, str]  # (family, table, chain)
RuleKey = tuple[str, str, str, int]  # (family, table, chain, handle)


@dataclass(frozen=True)
class SourceRule:
    line: int
    text: str  # as written, whitespace collapsed


@dataclass(frozen=True)
class SourceChain:
    family: str
    table: str
    name: str
    hook: str | None  # 'forward', 'input', ...; None for a chain reached only by jumps
    chain_type: str | None  # 'filter' | 'nat' | 'route'
    policy: str | None  # as written: 'DROP', 'drop'
    policy_line: int | None
    rules: tuple[SourceRule, ...]
    exact: bool  # False when the file edits the chain in ways positions cannot follow

    @property
    def key(self) -> ChainKey:
        return (self.family, self.table, self.name)


@dataclass(frozen=True)
class SourceIndex:
    file: str
    format: str  # 'iptables' | 'nft'
    chains: tuple[SourceChain, ...]

    def chain(self, family: str, table: str, name: str) -> SourceChain | None:
        return next((c for c in self.chains if c.key == (family, table, name)), None)

    def base_chain(self, hook: str) -> SourceChain | None:
        """The user's filter chain on this hook ('forward', 'input'): where an allow rule goes."""
        hooked = [c for c in self.chains if c.hook == hook and c.chain_type == "filter"]
        return next((c for c in hooked if c.table == "filter"), hooked[0] if hooked else None)


@dataclass(frozen=True)
class RuleRef:
    file: str
    line: int | None  # None: named by its loaded text, the line is not known
    text: str

    def describe(self) -> str:
        return f"{self.file}:{'?' if self.line is None else self.line}: {self.text}"


@dataclass(frozen=True)
class RuleMap:
    file: str
    rules: Mapping[RuleKey, RuleRef]
    policies: Mapping[ChainKey, RuleRef]  # base chains only
    unmatched: tuple[ChainKey, ...]  # loaded chains whose rules could not be given lines

    def explain(self, decision: Decision) -> RuleRef:
        """The line behind a trace's decision; without one, the rule as the trace printed it."""
        if decision.kind == DecisionKind.POLICY:
            found = self.policies.get((decision.family, decision.table, decision.chain))
            return found or RuleRef(self.file, None, f"no rule matched: chain {decision.chain} {decision.text}")
        found = self.rules.get((decision.family, decision.table, decision.chain, decision.handle))
        if found and found.line is not None:
            return found
        return RuleRef(self.file, None, decision.text or (found.text if found else ""))


@dataclass
class _Chain:
    """A chain while the file is read."""
    family: str
    table: str
    name: str
    hook: str | None = None
    chain_type: str | None = None
    policy: str | None = None
    policy_line: int | None = None
    rules: list[SourceRule] = field(default_factory=list)
    exact: bool = True

    def frozen(self) -> SourceChain:
        return SourceChain(self.family, self.table, self.name, self.hook, self.chain_type, self.policy,
                           self.policy_line, tuple(self.rules), self.exact)


def _chain(chains: dict[ChainKey, _Chain], family: str, table: str, name: str) -> _Chain:
    """The chain, made on first mention (a file may append to a chain before declaring it)."""
    return chains.setdefault((family, table, name), _Chain(family, table, name))


def index_source(ruleset: Ruleset) -> SourceIndex:
    """Every chain of the user's file: its rule statements and policy, with their lines."""
    chains = _index_iptables(ruleset.text) if ruleset.format == "iptables" else _index_nft(ruleset.text)
    return SourceIndex(ruleset.source, ruleset.format, tuple(c.frozen() for c in chains.values()))


def _index_iptables(text: str) -> dict[ChainKey, _Chain]:
    chains: dict[ChainKey, _Chain] = {}
    table = "filter"
    for number, raw in enumerate(text.splitlines(), 1):
        words = raw.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0].startswith("*"):
            table = words[0][1:]
        elif words[0].startswith(":"):  # `:FORWARD DROP [0:0]`; user chains have policy `-`
            chain = _chain(chains, "ip", table, words[0][1:])
            if chain.name in _IPTABLES_HOOKS:
                chain.hook, chain.chain_type = chain.name.lower(), "nat" if table == "nat" else "filter"
            if len(words) > 1 and words[1] != "-":
                chain.policy, chain.policy_line = words[1], number
        elif words[0].startswith("-") and len(words) > 1:
            chain, command = _chain(chains, "ip", table, words[1]), _IPTABLES_COMMANDS.get(words[0])
            if command == "append":
                chain.rules.append(SourceRule(number, " ".join(words)))
            elif command == "insert":  # -I CHAIN [position] ...: the list insert iptables does
                position = int(words[2]) if len(words) > 2 and words[2].isdigit() else 1
                chain.rules.insert(position - 1, SourceRule(number, " ".join(words)))
            elif command == "policy" and len(words) > 2:
                chain.policy, chain.policy_line = words[2], number
            elif command != "new":  # -D, -R, -F, -E: positions no longer follow the file
                chain.exact = False
    return chains


def _nft_block(stack: list[str], header: str) -> str | None:
    """The block a `{` after this header opens, or None when the brace belongs to an expression."""
    words = header.split()
    if not words or (stack and stack[-1] != "table"):
        return None  # in a chain or a set: anonymous sets, `elements = { ... }`
    if stack:
        return "chain" if words[0] == "chain" else "object"
    if words[0] == "table":
        return "table"
    if words[0] in ("add", "create") and len(words) > 1 and words[1] not in ("rule", "element"):
        return words[1] if words[1] in ("table", "chain") else "object"
    return None


def _nft_statements(text: str):
    """(line, kind, text): kind 'open:<block>' (text is the header), 'close' or 'stmt'.

    Statements end at `;` or a newline outside braces; comments are dropped; a statement's line
    is where it starts (a rule whose anonymous set spans lines keeps its first line).
    """
    stack: list[str] = []
    buffer: list[str] = []
    start, depth, line = 0, 0, 1

    def take() -> str:
        statement = " ".join("".join(buffer).split())
        buffer.clear()
        return statement

    for token in _NFT_TOKEN.findall(text):
        if token.startswith("#"):
            continue
        if not "".join(buffer).strip() and token.strip() not in ("", ";", "}", "\\"):
            start = line  # the statement (or block header) starts here
        if token == "\\\n" or (token == "\n" and depth):
            buffer.append(" ")  # a continued line, or a set spread over lines
        elif token == "{" and depth == 0 and (block := _nft_block(stack, "".join(buffer))):
            stack.append(block)
            yield start, f"open:{block}", take()
        elif token in "{}" and (token == "{" or depth):
            depth += 1 if token == "{" else -1
            buffer.append(token)
        elif token in (";", "\n", "}"):
            if statement := take():
                yield start, "stmt", statement
            if token == "}":
                stack and stack.pop()
                yield line, "close", ""
        else:
            buffer.append(token)
        line += token.count("\n")


def _nft_names(words: list[str]) -> tuple[str, list[str]]:
    """(family, the rest) of `[family] table [chain] ...`; nft's default family is ip."""
    family = words[0] if words and words[0] in FAMILIES else None
    return family or "ip", [w.strip('"') for w in words[1 if family else 0:]]


def _index_nft(text: str) -> dict[ChainKey, _Chain]:
    chains: dict[ChainKey, _Chain] = {}
    frames: list[tuple[str, ...]] = []  # ('table', family, table) | ('chain', family, table, chain) | ('object',)
    for number, kind, statement in _nft_statements(text):
        words = statement.split()
        if kind == "open:table":  # `table [family] NAME {` or `add table ... {`
            family, rest = _nft_names(words[2:] if words[0] != "table" else words[1:])
            frames.append(("table", family, (rest or [""])[0]))
        elif kind == "open:chain" and frames:  # `chain NAME {` in a table
            frames.append(("chain", *frames[-1][1:3], words[-1].strip('"')))
        elif kind == "open:chain":  # `add chain [family] TABLE NAME {`
            family, rest = _nft_names(words[2:])
            frames.append(("chain", family, *(rest + ["", ""])[:2]))
        elif kind.startswith("open:"):
            frames.append(("object",))
        elif kind == "close":
            frames and frames.pop()
        elif frames and frames[-1][0] == "chain":
            _nft_chain_statement(_chain(chains, *frames[-1][1:]), number, statement)
        elif not frames:
            _nft_command(chains, number, words)
        if kind == "open:chain":
            _chain(chains, *frames[-1][1:])
    return chains


def _nft_chain_statement(chain: _Chain, number: int, statement: str) -> None:
    words = statement.split()
    if words[0] == "type" and "hook" in words[:-1]:
        chain.chain_type, chain.hook = words[1], words[words.index("hook") + 1]
    elif words[0] == "policy" and len(words) > 1:
        chain.policy, chain.policy_line = words[1], number
    elif words[0] not in ("comment", "device", "devices"):  # chain properties, not rules
        chain.rules.append(SourceRule(number, statement))


def _nft_command(chains: dict[ChainKey, _Chain], number: int, words: list[str]) -> None:
    """A top-level command: `add rule`, `insert rule`, `add chain`, `flush ...`, `delete ...`."""
    if words[:2] == ["flush", "ruleset"]:
        chains.clear()
        return
    verb, noun = (words + [""])[:2]
    family, rest = _nft_names(words[2:])
    if not rest:
        return
    if noun == "chain" and verb in ("add", "create") and len(rest) > 1:
        _chain(chains, family, rest[0], rest[1])
    elif noun == "rule" and verb in ("add", "insert") and len(rest) > 2 \
            and not _NFT_POSITIONED.match(" ".join(rest[2:])):
        chain, source = _chain(chains, family, rest[0], rest[1]), SourceRule(number, " ".join(words))
        chain.rules.insert(len(chain.rules) if verb == "add" else 0, source)
    elif verb in ("flush", "delete", "destroy", "replace") or noun == "rule":
        # rules removed or placed by handle: the positions of what is left cannot be followed
        for chain in chains.values():
            if (chain.family, chain.table) == (family, rest[0]) and (noun == "table" or [chain.name] == rest[1:2]):
                chain.exact = False


def attribute(listing_json: str | Mapping, index: SourceIndex) -> RuleMap:
    """Map each loaded rule (by handle) and base-chain policy to its line in the user's file."""
    listed: dict[ChainKey, list[tuple[int, str]]] = {}
    policies: dict[ChainKey, str] = {}
    for item in _listing_items(listing_json):
        if isinstance(item.get("chain"), Mapping):
            chain = item["chain"]
            key = (chain.get("family"), chain.get("table"), chain.get("name"))
            listed.setdefault(key, [])
            if "hook" in chain:
                policies[key] = chain.get("policy", "accept")
        elif isinstance(item.get("rule"), Mapping):
            rule = item["rule"]
            key = (rule.get("family"), rule.get("table"), rule.get("chain"))
            listed.setdefault(key, []).append((rule.get("handle"), _render(rule)))
    rules: dict[RuleKey, RuleRef] = {}
    policy_refs: dict[ChainKey, RuleRef] = {}
    unmatched: list[ChainKey] = []
    for key, loaded in listed.items():
        if key[1] == TRACE_TABLE_NAME:
            continue
        source = index.chain(*key)
        exact = source is not None and source.exact and len(source.rules) == len(loaded)
        if not exact and (loaded or source is None):
            unmatched.append(key)
        for position, (handle, text) in enumerate(loaded):
            written = source.rules[position] if exact else None
            rules[(*key, handle)] = (RuleRef(index.file, written.line, written.text) if written
                                     else RuleRef(index.file, None, text))
        if key in policies:
            policy = source.policy if source and source.policy else policies[key]
            policy_refs[key] = RuleRef(index.file, source.policy_line if source else None,
                                       f"no rule matched: chain {key[2]} policy {policy}")
    return RuleMap(index.file, rules, policy_refs, tuple(unmatched))


def _listing_items(listing_json: str | Mapping) -> list[Mapping]:
    try:
        data = json.loads(listing_json) if isinstance(listing_json, str) else listing_json
    except json.JSONDecodeError as exc:
        raise LabError(f"ruleset listing is not JSON (line {exc.lineno}): expected `nft -j -a list ruleset` output") from None
    items = data.get("nftables") if isinstance(data, Mapping) else None
    if not isinstance(items, list):
        raise LabError('ruleset listing has no "nftables" list: expected `nft -j -a list ruleset` output')
    return [item for item in items if isinstance(item, Mapping)]


def _render(rule: Mapping) -> str:
    """Approximate nft text of a listed rule (the JSON has none): enough to recognise it."""
    words: list[str] = []
    for expr in rule.get("expr", []):
        for name, value in expr.items() if isinstance(expr, Mapping) else ():
            if name == "match" and isinstance(value, Mapping):
                op = value.get("op", "==")
                words += [_render_value(value.get("left")), *([] if op in ("==", "in") else [op]),
                          _render_value(value.get("right"))]
            else:  # accept, drop, counter, reject, jump X, xt target CT ...
                details = value if isinstance(value, Mapping) else {}
                words += [name, *(str(details[k]) for k in ("type", "name", "target") if k in details)]
    return " ".join(words + ([f'comment "{rule["comment"]}"'] if rule.get("comment") else []))


def _render_value(value) -> str:
    if isinstance(value, list):
        return ",".join(map(_render_value, value))
    if not isinstance(value, Mapping) or not value:
        return str(value)
    kind, inner = next(iter(value.items()))
    if kind == "set":
        return "{ " + ", ".join(map(_render_value, inner if isinstance(inner, list) else [inner])) + " }"
    if kind == "prefix":
        return f"{inner.get('addr')}/{inner.get('len')}"
    if kind == "range":
        return "-".join(map(_render_value, inner))
    if kind in ("payload", "meta", "ct") and isinstance(inner, Mapping):
        return f"{inner.get('protocol', kind)} {inner.get('field', inner.get('key'))}"
    return kind


def allow_rule(fmt: str, src: str, dst: str, transport: str, port: int | None,
               chain_hint: str | SourceChain = "forward", *, insert: bool = False) -> str:
    """The least rule that admits a new flow src -> dst, in the user's format.

    chain_hint: the user's own chain, `index.base_chain(hook) or hook`, or a hook name ('forward';
    'input' for a host firewall). insert=True puts the rule first: needed when a rule, not the
    policy, dropped the flow (an appended rule would never be reached).
    """
    if transport not in ("tcp", "udp", "icmp"):
        raise LabError(f"allow rule for transport {transport!r}: use tcp, udp or icmp")
    if transport != "icmp" and not port:
        raise LabError(f"allow rule for {transport} {src} -> {dst} needs a port")
    if fmt == "iptables":
        name = chain_hint.name if isinstance(chain_hint, SourceChain) else chain_hint
        chain = name.upper() if name.upper() in _IPTABLES_HOOKS else name
        match = ("-p icmp -m icmp --icmp-type 8" if transport == "icmp"
                 else f"-p {transport} -m {transport} --dport {port}")
        hosts = " ".join(f"{flag} {a if '/' in a else a + '/32'}" for flag, a in (("-s", src), ("-d", dst)))
        return f"{'-I' if insert else '-A'} {chain} {hosts} {match} -m conntrack --ctstate NEW -j ACCEPT"
    if fmt == "nft":
        family, table, chain = (chain_hint.key if isinstance(chain_hint, SourceChain)
                                else ("inet", "filter", chain_hint))
        match = "icmp type echo-request" if transport == "icmp" else f"{transport} dport {port}"
        return (f"{'insert' if insert else 'add'} rule {family} {table} {chain} "
                f"ip saddr {src} ip daddr {dst} {match} ct state new accept")
    raise LabError(f"unknown rules format {fmt!r}; use iptables or nft")


def reply_rule(fmt: str, chain_hint: str | SourceChain = "forward") -> str:
    """The rule that admits the replies of admitted flows (a ruleset without state drops them).

    A reply is no new flow: its destination port is the client's own, so only connection state
    admits it. chain_hint: the user's chain on the hook the reply crosses, as for allow_rule.
    """
    if fmt == "iptables":
        name = chain_hint.name if isinstance(chain_hint, SourceChain) else chain_hint
        chain = name.upper() if name.upper() in _IPTABLES_HOOKS else name
        return f"-I {chain} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
    if fmt == "nft":
        family, table, chain = (chain_hint.key if isinstance(chain_hint, SourceChain)
                                else ("inet", "filter", chain_hint))
        return f"insert rule {family} {table} {chain} ct state established,related accept"
    raise LabError(f"unknown rules format {fmt!r}; use iptables or nft")


def ftp_helper_rule(fmt: str, server: str, port: int, hook: str = "prerouting",
                    table_hint: SourceChain | None = None) -> str:
    """The conntrack FTP helper on a server's control port, which admits its data channels as RELATED.

    hook: 'prerouting' for what a node forwards or receives, 'output' for what its own host opens.
    For nft the helper object and its chain go into the table of table_hint (the user's base chain).
    """
    if fmt == "iptables":
        return f"-t raw -A {hook.upper()} -d {server}/32 -p tcp -m tcp --dport {port} -j CT --helper ftp"
    if fmt == "nft":
        family, table = table_hint.key[:2] if table_hint is not None else ("inet", "filter")
        return (f'add ct helper {family} {table} ftp-standard {{ type "ftp" protocol tcp ; }} ; '
                f"add chain {family} {table} ftp_helpers {{ type filter hook {hook} priority filter ; }} ; "
                f'add rule {family} {table} ftp_helpers ip daddr {server} tcp dport {port} ct helper set "ftp-standard"')
    raise LabError(f"unknown rules format {fmt!r}; use iptables or nft")
