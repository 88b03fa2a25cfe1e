"""The PII detectors: each finds the spans of one kind of PII in a text (``Match``: rule, span, normal form);
``adaptloop.streams.pii`` runs them in order and redacts what they find.

Why these detectors and not one library: Presidio (the maintained all-in-one detector) needs a
spaCy language model from a model hub, and nothing is downloaded at run time here; detect-secrets
scans files line by line with entropy plugins and flags far too many ordinary tokens (order numbers,
hashes) for free text. So each kind uses the best small library there is:

- phone numbers: Google's libphonenumber port (``phonenumbers``), valid numbers only, with ``+`` or the
  ``00`` exit code before the country code. A bare digit run (no ``+``, no separators) counts only after
  a phone cue ("call", "tel", "phone" ...): bare digit runs in agent traffic are far more often order,
  invoice or tracking numbers.
- IBANs: ``stdnum.iban`` (country length + mod-97 check), in any case, normalised to upper case;
  payment cards: ``stdnum.luhn`` plus the issuer prefixes of the card networks (a random 16-digit id
  passes Luhn one time in ten);
- IP addresses: the stdlib ``ipaddress`` validates what a regex finds; a dotted quad preceded by
  "v"/"version" is a version string, not an address; loopback and unspecified addresses (127.0.0.1,
  ::1, 0.0.0.0) identify no one and stay (every gateway record names its replica's URL);
- e-mail addresses and secrets/API keys: regexes for the documented key shapes (AWS, GitHub, GitLab,
  Hugging Face, Slack, Stripe, Google, Azure, OpenAI-style ``sk-``, JWTs, PEM and PGP private keys), and
  for the value of a secret's name wherever agent traffic writes one: JSON and dicts, env files, CLI
  flags, query strings, YAML, XML, headers, chat ("my password is ..."), connection strings
  (``AccountKey=``), the password of a URL. Only the value goes (``{"password": "[SECRET]"}`` is still
  JSON), and not where it stands in for a secret (``<password>``, ``${DB_PASSWORD}``, ``********``);
- user patterns: named regexes from settings (``ADAPTLOOP_STREAMS_PII_PATTERNS``).
"""

from __future__ import annotations

import bisect
import ipaddress
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import phonenumbers
from stdnum import iban as _iban
from stdnum import luhn as _luhn

EMAIL, PHONE, CARD, IBAN, IP, SECRET = "email", "phone", "card", "iban", "ip", "secret"

#: A local part starts where no local-part character precedes it: from anywhere else the scan would run over the
#: same characters again (quadratic time on a long run such as "a%a%a%...@").
_EMAIL_RE = re.compile(r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
#: Where a named secret's value starts and ends. Quoted: up to the same quote (escaped as it is in JSON inside JSON,
#: or not). Bare: up to what ends a value in an env file, a connection string (;), a query string (&name=), JSON (,)
#: or a sentence; not from a dash (the next CLI flag) nor over a backslash (the next line of an escaped file).
#: Neither holds whitespace: a value with spaces after such a name is a sentence or a UI label far more often than a
#: passphrase. Runs of ordinary characters go through one character class (a group per character costs ten times as
#: much on a long value), possessively, so that no run is ever split two ways.
_VALUE_CHAR = r"[^\s\"'`,;&<>\\]"
_QUOTED_CHAR = r"[^\s\"'`\\]"


def _value(shortest: int) -> str:
    quoted = rf"(?={_QUOTED_CHAR}{{{shortest}}})(?:{_QUOTED_CHAR}++|(?!(?P=quote))\S)++"
    bare = rf"(?!-){_VALUE_CHAR}{{{shortest},}}+(?:&(?!\w+=){_VALUE_CHAR}*+)*+"
    return rf"(?P<quote>\\*[\"'`])?(?P<value>(?(quote){quoted}|{bare}))"


#: Names whose value is a password, and names whose value is a key, token or secret; the name ends there
#: (``password_reset_url``, ``token_type``, ``max_tokens``, ``secretName`` and ``public_key`` name no secret).
#: Any prefix is fine (``DB_PASSWORD``, ``PGPASSWORD``, ``client_secret``, ``aws_secret_access_key``,
#: ``AccountKey``); a signup form repeats the password (``password_confirmation``, Django's ``password2``);
#: ``pass`` only as a word's tail (Ansible's ``ansible_become_pass``, not ``bypass``), ``pwd`` only as MYSQL_PWD or
#: ODBC's ``;PWD=`` (a shell's PWD is a directory); a page token is a pagination cursor. A name's pattern starts
#: with one of a few letters and looks back for the rest: a scan that can skip to those letters runs several times
#: faster than one trying an alternation at every character.
_PASSWORD_NAME = r"p(?:ass(?:word(?:[_-]?confirm(?:ation)?|[12])?|wd|phrase)|ass(?<=[_-]pass)|(?<=[;_\"']p)wd)"
#: The kinds of key a name may end with, and what may join kind and "key" ("api key" in chat, but "private key"
#: is what every PEM block says).
_KEY_KINDS = {"api": ("", "_", "-", " "), "access": ("", "_", "-", " "), "account": ("", "_", "-", " "),
              "secret": ("", "_", "-", " "), "private": ("", "_", "-"), "signing": ("", "_", "-"),
              "encryption": ("", "_", "-"), "master": ("", "_", "-")}
_KEY_NAME = ("(?:secret|token(?<!pagetoken)(?<!page_token)(?<!page-token)|key(?:"
             + "|".join(f"(?<={kind}{re.escape(joint)}key)" for kind, joints in _KEY_KINDS.items() for joint in joints)
             + "))")
#: The prefilter's words for these names (every name holds one). Not "key": every PEM block says "PRIVATE KEY".
_PASSWORD_WORDS = ("passw", "passphrase", "_pass", "-pass", "pwd")
_KEY_WORDS = ("secret", "token", "api", "access", "account", "signing", "encryption", "private_key", "privatekey",
              "private-key", "master_key", "masterkey", "master-key")
#: The separators that say "this name has this value": an assignment (env file, ``--flag=``, query string, code),
#: a quoted name and a colon (JSON, a Python dict), a comparison with a literal (``password == "hunter2"``; with a
#: name it is code), an XML element.
_ASSIGNED = (r"(?:\\*[\"'`]?[ \t]*(?:=>|:=|=)[ \t]*|\\*[\"'`][ \t]*:[ \t]*|[ \t]*==[ \t]*(?=\\*[\"'`])"
             r"|>(?=[^<\s]+</))")
#: A plain colon or "is" (YAML, a header, chat) is followed by prose as often as by a value: there the value must be
#: quoted, or longer than a count ("password is 12 characters") and hold a digit or an inner symbol, or be longer
#: than a word ("password: reset it" is no password). The same goes for a CLI flag's value after a space.
_STATED = r"(?:\\*[\"'`]?(?:[ \t]*:|[ \t]+(?:is|was)\b:?)[ \t]*)"
_NOT_A_WORD = (r"(?=\\*[\"'`]|(?=[^\s\"'`,;&<>\\]{4})[^\s\"'`,;&<>\\]*(?:\d|[^\w\s\"'`,;&<>\\][^\s\"'`,;&<>\\])"
               r"|[A-Za-z]{13})")
#: Generated keys and tokens hold a digit, or are long: a name's plain-word value (a tokenizer's "token") is not one.
_GENERATED = r"(?=\\*[\"'`]?(?:[^\s\"'`,;&<>\\]*\d|[^\s\"'`,;&<>\\]{20}))"
#: A value that stands for a secret without being one: a template or an environment reference (``<password>``,
#: ``${DB_PASSWORD}``, ``{{ secret }}``, ``%(pw)s``, YAML's ``!Ref``), a mask (``********``, ``xxxx``), our own
#: placeholder (``[SECRET]``), a comment, a type or literal of code or a schema, the words documentation writes in
#: a secret's place.
_STAND_IN_VALUE = re.compile(r"""(?ix)
    [<${%\[(*#]
  | !(?:ref|sub|getatt|vault|secret|env|include)$
  | (.)\1*$
  | (?:none|null|nil|undefined|true|false|yes|no|str|string|bytes|int|integer|secretstr|text|required|optional|empty
      |redacted|removed|hidden|masked|omitted|sensitive|example|placeholder|dummy|value
      |pass(?:word|wd|phrase)?|pwd|secret|token|api[_-]?key|key)$
  | your[_-]?[a-z]
""")
#: An unquoted value that is code, not a literal: a call, an item or a type (``password=getpass()``,
#: ``password=os.environ["PW"]``, ``token: Optional[str]``), an attribute (``token=self.token``), a variable named
#: for what it holds (``api_key=OPENAI_API_KEY``, ``password=db_password``).
_CODE_REFERENCE = re.compile(r"[A-Za-z_][\w.]*[(\[].*|[a-z_][a-z0-9_]*(?:\.\w+)+"
                             r"|\w*[_.](?i:pass(?:word|wd|phrase)?|pwd|secret|token|api_?key|key)")


#: Secret shapes, each with the words one of which every match contains (lowercase): a pattern runs only on
#: a text that holds one of its words, as most texts hold no secret (a substring test costs far less than a scan).
#: A shape with a ``value`` group redacts only that group, and not where the value stands in for a secret.
#: Regexes, not a library: detect-secrets' keyword plugin flags far too much free text (see above), and a URL
#: parser (urllib.parse, yarl) takes a URL already cut out of its text, where finding its ends is the hard part.
_SECRET_RES = [(words, re.compile(p)) for words, p in (
    (("akia", "asia"), r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),                        # AWS access key id
    # ... and the secret access key right after it: the two columns of the credentials CSV AWS hands out
    (("akia", "asia"), r"\b(?:AKIA|ASIA)[0-9A-Z]{16}[\s,;:|\"'=]{1,8}(?P<value>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])"),
    (("ghp_", "gho_", "ghu_", "ghs_", "ghr_"), r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),  # GitHub tokens
    (("github_pat_",), r"\bgithub_pat_[A-Za-z0-9_]{40,}\b"),
    (("glpat-",), r"\bglpat-[A-Za-z0-9_-]{20,}"),                                # GitLab
    (("hf_",), r"\bhf_[A-Za-z0-9]{34,}\b"),                                       # Hugging Face
    (("xox",), r"\bxox[abposr]-[A-Za-z0-9-]{10,}\b"),                             # Slack
    (("_live_", "_test_"), r"\b(?:sk|pk|rk)_(?:live|test)_[0-9A-Za-z]{16,}\b"),    # Stripe
    (("aiza",), r"\bAIza[0-9A-Za-z_-]{35}\b"),                                    # Google API key
    (("gocspx-",), r"\bGOCSPX-[A-Za-z0-9_-]{20,}"),                               # Google OAuth client secret
    (("ya29.",), r"\bya29\.[0-9A-Za-z_-]{20,}"),                                  # Google OAuth access token
    (("q~",), r"(?<![\w~.-])[\w~.-]{3}\dQ~[\w~.-]{31,34}(?![\w~.-])"),            # Azure AD client secret
    (("sig=",), r"(?i)[?&;]sig=(?P<value>[A-Za-z0-9%+/=]{16,})"),                 # Azure SAS signature
    (("sk-",), r"\bsk-(?:proj-|ant-)?[A-Za-z0-9_-]{20,}\b"),                      # OpenAI / Anthropic style
    (("alk_",), r"\balk_[0-9a-f]{8}_[A-Za-z0-9_-]{40,}"),                        # our gateway's keys (serving/keys.py)
    (("eyj",), r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\b"),  # JWT
    (("bearer",), r"(?i)\bbearer\s+(?P<value>[A-Za-z0-9._~+/-]{16,}=*)"),
    (("authorization",), r"(?i)\bauthorization\\*[\"'`]?[ \t]*[:=][ \t]*\\*[\"'`]?(?:basic|token)[ \t]+"
                         r"(?P<value>[A-Za-z0-9+/._~-]{8,}=*)"),
    # A password in a URL, whatever its host: postgres://admin:s3cret@10.0.0.5/db, redis://:pw@localhost:6379.
    # The password runs to the last @ before the path (people paste passwords with an unescaped @).
    (("://",), r"://[^\s:/?#@\[\]]*:(?P<value>[^\s/?#]+)@"),
    (_PASSWORD_WORDS, rf"(?i){_PASSWORD_NAME}(?:{_ASSIGNED}|{_STATED}{_NOT_A_WORD}){_value(2)}"),
    (_KEY_WORDS, rf"(?i){_KEY_NAME}(?:{_ASSIGNED}|{_STATED}{_NOT_A_WORD}){_GENERATED}{_value(8)}"),
    # A CLI flag and its value after a space (after "=" it is an assignment): --db-password s3cret!
    (_PASSWORD_WORDS, rf"(?i)--(?<![\w-]--)(?:[\w-]*[_-])?{_PASSWORD_NAME}[ \t]+{_NOT_A_WORD}{_value(2)}"),
    (_KEY_WORDS, rf"(?i)--(?<![\w-]--)(?:[\w-]*[_-])?{_KEY_NAME}[ \t]+{_NOT_A_WORD}{_GENERATED}{_value(8)}"),
    # curl's -u user:password; a few flags may come first (at most eight: a bounded look from each "curl")
    (("curl",), r"\bcurl\b(?:[ \t]+\S+){0,8}?[ \t]+(?:-u|--user)[ \t]+[\"']?[^\s:\"'@]+:(?P<value>[^\s\"'@]+)"),
)]


def _any_of(words: Iterable[str]) -> re.Pattern:
    """A regex for "any of these words" shaped as a trie: re tries a group's alternatives one after another at every
    position, and sixty flat words scan five times slower than their trie (as slow as the redaction's other rules)."""
    trie: dict = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}  # a word ends here

    def group(node: dict) -> str:
        branches = [re.escape(char) + group(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 and "" not in node else f"(?:{'|'.join(branches)})"
        return body + ("?" if "" in node else "")
    return re.compile(group(trie))


_ANY_SECRET_WORD = _any_of(word for words, _ in _SECRET_RES for word in words)
#: IBANs are written in groups of four; people type them in lower case too (stdnum validates the uppercase form).
_IBAN_RE = re.compile(r"(?i)\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
_TRAILING_WORDS = re.compile(r"(?: [A-Za-z]{1,4})+$")
_CARD_RE = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_CARD_PREFIX = re.compile(r"^(?:4|5[1-5]|2[2-7]|3[47]|3[068]|6011|65|64[4-9]|35|62)")
_IPV4_RE = re.compile(r"(?<![\w.])(\d{1,3}(?:\.\d{1,3}){3})(?![\w.]|\.\d)")
_IPV6_RE = re.compile(r"(?<![\w:])((?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4})(?![\w:])")
_VERSION_CUE = re.compile(r"(?i)(?:\bv|\b(?:version|release|section|chapter|clause|paragraph|step|build)\s*)$")
_GLUED = re.compile(r"[A-Za-z0-9_][-/#]?$")
_DIGIT = re.compile(r"\d")
#: The shortest national number of any region in libphonenumber's metadata (a unit test checks it):
#: a text with fewer digits holds no valid phone number, and the matcher is most of redaction's cost.
MIN_PHONE_DIGITS = 4
#: Payment card numbers are 13 to 19 digits long (ISO/IEC 7812).
MIN_CARD_DIGITS, MAX_CARD_DIGITS = 13, 19
PHONE_CUE_CHARS = 48
#: "00" dialled before a country code, as most of the world writes it (0044 20 7946 0958): libphonenumber reads
#: it only where the region's own exit code is 00, so it is read as "+". Not inside a longer number, and not after
#: a digit group (the 0044 inside DE89 3704 0044 0532 ...).
_EXIT_CODE_00 = re.compile(r"(?<![\w.,+/-])(?<!\d )00(?=[1-9])")
_PHONE_CUE = re.compile(r"(?i)\b(?:phone|tel|telephone|call|mobile|cell|whatsapp|sms|fax|text me|reach me)\b[^.\n]{0,20}$")


@dataclass(frozen=True)
class Match:
    rule: str
    start: int
    end: int
    value: str  # the normalized identifier (for subject keys)


#: What comes before a URL's password: "password@db.example.com" in postgres://user:password@db.example.com is a
#: placeholder the secret rule left (a real password is gone by now), not an address. Looked for this far back.
_URL_USER_BEFORE = re.compile(r"://[^\s/?#@:]*:$")
URL_USER_CHARS = 64


def find_emails(text: str) -> Iterator[Match]:
    if "@" not in text:
        return
    for m in _EMAIL_RE.finditer(text):
        if not _URL_USER_BEFORE.search(text, max(0, m.start() - URL_USER_CHARS), m.start()):
            yield Match(EMAIL, m.start(), m.end(), m.group().lower())


_KEY_BEGIN = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
_KEY_END = re.compile(r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----")
#: A line of a key block: base64, or an armour header ("Proc-Type: 4,ENCRYPTED", "Version: GnuPG v2"). Its end
#: may be escaped, as in a service account's JSON ("-----BEGIN PRIVATE KEY-----\nMIIE...\n"), and the last line
#: of a key cut short ends the text or the string it is in.
_KEY_LINE = re.compile(r"[ \t]*(?:[A-Za-z0-9+/=]+|[A-Za-z-]+: [^\n\\]*)?[ \t]*(?:\r?\n|\\(?:r\\)?n)"
                       r"|[ \t]*[A-Za-z0-9+/=]+[ \t]*(?:\Z|(?=\\*[\"']))")


def _private_keys(text: str) -> Iterator[Match]:
    """PEM and PGP private key blocks, whole or cut short (no END line: up to where the key's lines stop), in
    one pass: each BEGIN is paired with the first END after it unless another BEGIN comes first. A regex with
    a lazy body would rescan the rest of the text from every BEGIN (quadratic on repeated BEGIN lines)."""
    begins = list(_KEY_BEGIN.finditer(text))
    if not begins:
        return
    ends = [m.end() for m in _KEY_END.finditer(text)]
    covered = 0
    for i, begin in enumerate(begins):
        if begin.start() < covered:
            continue
        limit = begins[i + 1].start() if i + 1 < len(begins) else len(text)
        k = bisect.bisect_right(ends, begin.end())
        if k < len(ends) and ends[k] <= limit:
            covered = ends[k]
        else:
            covered = begin.end()
            while covered < limit and (line := _KEY_LINE.match(text, covered, limit)) and line.end() > covered:
                covered = line.end()
        yield Match(SECRET, begin.start(), covered, "")


def find_secrets(text: str) -> Iterator[Match]:
    # Casefolded, and dotless i as i: what IGNORECASE matches ("ſ" as "s", "K" as "k", "ı" as "i") holds the word.
    lowered = text.casefold().replace("\u0131", "i")
    if "-----begin" in lowered:
        yield from _private_keys(text)
    if not _ANY_SECRET_WORD.search(lowered):
        return
    present: dict[tuple[str, ...], bool] = {}  # several patterns share their words: each word is looked for once
    for words, pattern in _SECRET_RES:
        if words not in present:
            present[words] = any(word in lowered for word in words)
        if not present[words]:
            continue
        for m in pattern.finditer(text):
            if "value" not in pattern.groupindex:
                yield Match(SECRET, m.start(), m.end(), "")
            elif not _stands_in_for_a_secret(m):
                yield Match(SECRET, m.start("value"), m.end("value"), "")


def _stands_in_for_a_secret(m: re.Match) -> bool:
    value = m.group("value")
    if _STAND_IN_VALUE.match(value) or value[-5:].casefold() in ("_here", "-here"):  # "your-token-here"
        return True
    if "***" in value or "..." in value or "\u2026" in value:  # shown in part: "sk-...f3a9", "hunt****"
        return True
    unquoted = "quote" in m.re.groupindex and m.group("quote") is None
    return bool(unquoted and _CODE_REFERENCE.fullmatch(value))


def _mod97(compact: str) -> bool:
    """ISO 13616's check on an uppercase IBAN without spaces: a cheap gate before stdnum's full validation,
    whose input cleaning costs ~50 us a candidate (a text of IBAN-like groups holds one candidate per group)."""
    rearranged = compact[4:] + compact[:4]
    return rearranged.isalnum() and int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def find_ibans(text: str) -> Iterator[Match]:
    for m in _IBAN_RE.finditer(text):
        candidate = m.group()
        # In any case, the words after an IBAN read as its last groups ("BE68 5390 0754 7034 for refunds"): an IBAN
        # ends in its account number, so where the whole fails, it is tried once more without trailing letters.
        words = _TRAILING_WORDS.search(candidate)
        for length in (len(candidate), words.start()) if words else (len(candidate),):
            compact = candidate[:length].replace(" ", "").upper()
            if _mod97(compact) and _iban.is_valid(compact):
                yield Match(IBAN, m.start(), m.start() + length, compact)
                break


def find_cards(text: str) -> Iterator[Match]:
    if len(_DIGIT.findall(text)) < MIN_CARD_DIGITS:
        return
    for m in _CARD_RE.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if MIN_CARD_DIGITS <= len(digits) <= MAX_CARD_DIGITS and _CARD_PREFIX.match(digits) and _luhn.is_valid(digits):
            yield Match(CARD, m.start(), m.end(), digits)


def find_ips(text: str) -> Iterator[Match]:
    # An IPv4 address has three dots, an IPv6 one at least two colons: counting them costs less than a scan.
    for m in _IPV4_RE.finditer(text) if text.count(".") >= 3 else ():
        if _VERSION_CUE.search(text[max(0, m.start() - 10):m.start()]):
            continue
        try:
            address = ipaddress.IPv4Address(m.group(1))
        except ValueError:
            continue
        if not (address.is_loopback or address.is_unspecified):
            yield Match(IP, m.start(), m.end(), str(address))
    for m in _IPV6_RE.finditer(text) if text.count(":") >= 2 else ():
        candidate = m.group(1)
        if candidate.count(":") < 2 or not re.search(r"[0-9A-Fa-f]", candidate):
            continue
        try:
            address = ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        if not (address.is_loopback or address.is_unspecified):
            yield Match(IP, m.start(), m.end(), str(address))


def phone_finder(region: str) -> Callable[[str], Iterator[Match]]:
    def find(text: str) -> Iterator[Match]:
        if len(_DIGIT.findall(text)) < MIN_PHONE_DIGITS:
            return
        # " +" for "00" keeps every offset: a match found in the copy is the same span of the text.
        exit_codes = {m.start() for m in _EXIT_CODE_00.finditer(text)} if "00" in text else set()
        international = _EXIT_CODE_00.sub(" +", text) if exit_codes else text
        for m in phonenumbers.PhoneNumberMatcher(international, region, leniency=phonenumbers.Leniency.VALID):
            start = m.start - 1 if m.start - 1 in exit_codes else m.start
            raw = text[start:m.end]
            before = text[max(0, start - PHONE_CUE_CHARS):start]  # the cues look back this far at most
            if raw.isdigit() and not _PHONE_CUE.search(before):
                continue  # a bare digit run without a phone cue: an order/invoice/tracking number
            if _GLUED.search(before):
                continue  # the tail of an identifier such as INV-2024-000123
            e164 = phonenumbers.format_number(m.number, phonenumbers.PhoneNumberFormat.E164)
            yield Match(PHONE, start, m.end, e164)
    return find
