"""Markdown read the way the documentation checks need it (tests/test_docs.py): fenced blocks, the shell
commands in them as argument lists, inline code, relative links, and the anchors GitHub gives headings.

Only the Markdown GitHub renders matters here: ``` or ~~~ fences (indented in lists too), ATX and
setext headings, inline and reference links. Shell is read as far as documentation uses it: `\\`
continuations, `&&` `||` `;` `|` between commands, redirections, here-documents, `VAR=value`
prefixes, `# comments`.
"""
import html
import re
import shlex
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHELL_LANGUAGES = {"bash", "sh", "shell", "console", "zsh"}
# an unlabeled block whose first line starts with one of these holds commands
COMMAND_WORDS = {"minimind", "python", "python3", "torchrun", "pip", "$"}
OPERATORS = {"&&", "||", ";", "|", "&", "(", ")", "((", "))", ";;", "|&"}
PREFIX_WORDS = {"do", "then", "else", "time", "sudo", "nohup", "exec", "env", "!"}
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^\s`{]*)")
ATX_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
SETEXT_UNDERLINE = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
CODE_SPAN = re.compile(r"(?s)(`+)(.+?)(?<!`)\1(?!`)")
INLINE_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*(<[^>]*>|[^\s()]+(?:\([^\s()]*\)[^\s()]*)*)"
                         r"(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(\S+)", re.MULTILINE)
HTML_ANCHOR = re.compile(r"<a\s[^>]*\b(?:name|id)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)


def markdown_files(root=REPO):
    """README.md, README.zh-CN.md and every docs/**/*.md that exists under `root`."""
    readmes = [root / name for name in ("README.md", "README.zh-CN.md") if (root / name).exists()]
    return readmes + sorted((root / "docs").rglob("*.md"))


def shown(path, root=REPO):
    """A path as messages show it: relative to the repository when it is inside."""
    path = Path(path)
    try:
        return path.resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path)


# ---------------------------------------------------------------- blocks and prose

@dataclass
class Block:
    """A fenced block: its language word and its body lines, numbered from 1 as in the file."""
    path: Path
    line: int  # the opening fence's line
    language: str
    lines: list

    @property
    def text(self):
        return "\n".join(self.lines)


@dataclass
class MarkdownFile:
    path: Path
    blocks: list
    prose: str  # the file with every fenced block blanked out, so that offsets still give line numbers

    def line_of(self, offset):
        return self.prose.count("\n", 0, offset) + 1


def read_markdown(path):
    """Split a Markdown file into fenced blocks and prose (blocks blanked out, line numbers kept)."""
    lines = Path(path).read_text(encoding="utf-8").split("\n")
    blocks, prose, open_block = [], [], None
    for number, line in enumerate(lines, 1):
        if open_block is None:
            match = FENCE.match(line)
            if match:
                open_block = (match, Block(Path(path), number, match.group(3).lower(), []))
                prose.append("")
            else:
                prose.append(line)
            continue
        match, block = open_block
        indent, fence = match.group(1), match.group(2)
        stripped = line.strip()
        if stripped.startswith(fence[0] * len(fence)) and not stripped.strip(fence[0]):
            blocks.append(block)
            open_block = None
        else:
            block.lines.append(line[len(indent):] if line.startswith(indent) else line.lstrip())
        prose.append("")
    if open_block is not None:  # an unclosed fence runs to the end of the file, as GitHub renders it
        blocks.append(open_block[1])
    return MarkdownFile(Path(path), blocks, "\n".join(prose))


def is_shell(block):
    """A block of shell commands: labeled bash/sh/shell/console, or unlabeled and starting with a command."""
    if block.language in SHELL_LANGUAGES:
        return True
    if block.language:
        return False
    first = next((line.strip() for line in block.lines if line.strip()), "")
    return first.split(" ")[0] in COMMAND_WORDS


def code_spans(markdown):
    """(line, text) of every inline code span in the prose; `\\|` (a pipe escaped in a table) reads as `|`."""
    return [(markdown.line_of(match.start()), match.group(2).strip().replace("\\|", "|"))
            for match in CODE_SPAN.finditer(markdown.prose)]


# ---------------------------------------------------------------- shell commands

@dataclass
class Command:
    """One simple command of a shell block: its words, where it starts, and the here-document it writes."""
    path: Path
    line: int
    argv: list
    writes: dict = field(default_factory=dict)  # file -> text, for `cat > FILE <<'EOF' ... EOF`

    @property
    def where(self):
        return f"{shown(self.path)}:{self.line}"

    @property
    def text(self):
        return shlex.join(self.argv)


def logical_lines(block):
    """(line number, text, here-document body) per command line: `\\` continuations and quotes that
    span lines joined, console prompts (`$ `) kept and their output dropped, here-document bodies taken
    out of the stream."""
    lines = list(enumerate(block.lines, block.line + 1))
    prompted = any(line.startswith("$ ") for _, line in lines)
    index = 0
    while index < len(lines):
        number, text = lines[index]
        index += 1
        if prompted:
            if not text.startswith("$ "):
                continue
            text = text[2:]
        while index < len(lines):
            if text.rstrip().endswith("\\"):
                text = text.rstrip()[:-1] + " " + lines[index][1].strip()
            elif words(text) is None:  # a quoted string goes on, as curl's -d '{ ... }' may
                text = text + "\n" + lines[index][1]
            else:
                break
            index += 1
        heredoc = re.search(r"<<-?\s*(['\"]?)(\w+)\1", text)
        body = None
        if heredoc:
            body_lines = []
            while index < len(lines) and lines[index][1].strip() != heredoc.group(2):
                body_lines.append(lines[index][1])
                index += 1
            index += 1  # the delimiter
            body = "\n".join(body_lines) + "\n"
        if text.strip():
            yield number, text, body


def without_comment(text):
    """The line up to its `# comment`: a `#` that starts a word outside quotes (`a#b` is no comment)."""
    quote, escaped = None, False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or text[index - 1].isspace()):
            return text[:index]
    return text


def words(text):
    """Shell words and operators of one line, comment left out; None if the quoting does not close."""
    lexer = shlex.shlex(without_comment(text), posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, ""
    try:
        return list(lexer)
    except ValueError:
        return None


def simple_commands(tokens):
    """Split words at operators; drop redirections (keeping where `>` writes) and `VAR=value` prefixes.
    Yields (argv, file written by `>` or None, whether the command reads a here-document)."""
    argv, target, heredoc = [], None, False
    tokens = list(tokens) + [";"]
    index = 0
    while index < len(tokens):
        token = tokens[index]
        index += 1
        if token in OPERATORS:
            while argv and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]) or argv[0] in PREFIX_WORDS):
                argv.pop(0)
            if argv:
                yield argv, target, heredoc
            argv, target, heredoc = [], None, False
        elif re.fullmatch(r"\d*(<<-?|<<<|>>|>\||[<>]&?|&>>?)", token):
            redirected = tokens[index] if index < len(tokens) else None
            if token.startswith("<<") and token != "<<<":
                heredoc = True
            elif ">" in token and redirected not in OPERATORS:
                target = redirected
            index += 1
        else:
            argv.append(token)


def shell_commands(block):
    """Every simple command of a shell block, with its line and the files its here-documents write."""
    commands = []
    for number, text, body in logical_lines(block):
        tokens = words(text)
        if tokens is None:
            commands.append(Command(block.path, number, ["<unbalanced quotes>", text]))
            continue
        for argv, target, heredoc in simple_commands(tokens):
            writes = {target: body} if heredoc and body is not None and target else {}
            commands.append(Command(block.path, number, argv, writes))
    return commands


# ---------------------------------------------------------------- links and anchors

def links(markdown):
    """(line, target) of every inline link, image and reference definition in the prose."""
    prose = CODE_SPAN.sub(lambda match: re.sub(r"[^\n]", " ", match.group(0)), markdown.prose)
    found = [(markdown.line_of(match.start(2)), match.group(2).strip("<>")) for match in INLINE_LINK.finditer(prose)]
    found += [(markdown.line_of(match.start(1)), match.group(1).strip("<>"))
              for match in REFERENCE_DEFINITION.finditer(prose)]
    return sorted(found)


def slug(text):
    """GitHub's anchor for a heading's text: lowercase; letters (CJK included), marks, digits, `_` and
    `-` kept, every other character dropped; each space becomes `-` (github-slugger's rule)."""
    kept = [c for c in text.lower() if c in " -_" or unicodedata.category(c)[0] in "LMN"
            or unicodedata.category(c) == "Pc"]
    return "".join(kept).replace(" ", "-")


class Slugger:
    """Slugs made unique as GitHub does: the second `Usage` is `usage-1`, the third `usage-2`."""

    def __init__(self):
        self.occurrences = {}

    def __call__(self, text):
        base = result = slug(text)
        while result in self.occurrences:
            self.occurrences[base] += 1
            result = f"{base}-{self.occurrences[base]}"
        self.occurrences[result] = 0
        return result


def heading_text(raw):
    """What a heading shows: link text without its target, code without backticks, no tags or `*`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", raw)
    text = re.sub(r"<[^>]+>", "", text)
    text = CODE_SPAN.sub(lambda match: match.group(2).strip(), text)
    return html.unescape(text.replace("*", "")).strip()


def headings(markdown):
    """(line, level, text) of every ATX (`## x`) and setext (`x` over `===`/`---`) heading."""
    lines = markdown.prose.split("\n")
    found = []
    for number, line in enumerate(lines, 1):
        atx = ATX_HEADING.match(line)
        if atx:
            found.append((number, len(atx.group(1)), heading_text(atx.group(2) or "")))
            continue
        previous = lines[number - 2] if number > 1 else ""
        underline = SETEXT_UNDERLINE.match(line)
        paragraph_line = previous.strip() and not previous.lstrip().startswith(("|", "-", "*", ">", "#"))
        if underline and paragraph_line:
            found.append((number - 1, 1 if underline.group(1)[0] == "=" else 2, heading_text(previous)))
    return found


def anchors(markdown):
    """Every `#anchor` a link into this file may use: heading slugs and explicit `<a name/id>`."""
    make = Slugger()
    return {make(text) for _, _, text in headings(markdown)} | set(HTML_ANCHOR.findall(markdown.prose))
