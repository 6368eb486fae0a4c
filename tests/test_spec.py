"""The route grammar (SPEC "Job spec grammar")."""

from __future__ import annotations

from typing import ClassVar

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.spec import (
    DockerApiRoute,
    HostTarget,
    JobSpec,
    MonitorRoute,
    SpecError,
    parse_route,
    redact_path,
    split_uri,
)


class Examples(SynchronousTestCase):
    """The SPEC's own examples."""

    def test_tts(self) -> None:
        s = parse_route("x:selmaproject:tts:777:5002")
        self.assertEqual(s, JobSpec("x", ("selmaproject", "tts"), "777", 5002))
        assert isinstance(s, JobSpec)
        self.assertEqual(s.ref, "selmaproject/tts:777")
        self.assertFalse(s.worker)

    def test_registry_host(self) -> None:
        s = parse_route("x:dockers.priberam.com:docker-tutorial:0.0.1:5006")
        assert isinstance(s, JobSpec)
        self.assertEqual(s.ref, "dockers.priberam.com/docker-tutorial:0.0.1")
        self.assertEqual(s.port, 5006)

    def test_single_component(self) -> None:
        s = parse_route("x:postgres:12:5432")
        assert isinstance(s, JobSpec)
        self.assertEqual((s.ref, s.port), ("postgres:12", 5432))

    def test_registry_with_port(self) -> None:
        s = parse_route("x:localhost%3A5000:team:app:1:8080")
        assert isinstance(s, JobSpec)
        self.assertEqual(s.ref, "localhost:5000/team/app:1")

    def test_docker_grammar_edges_accepted(self) -> None:
        """What Docker's reference grammar accepts parses here too: separators '__'
        and '-+', a registry with a port, exactly 255 characters, the longest
        labels and names DNS allows, a valid IDNA label, an IPv4-mapped IPv6 literal."""
        for seg, ref in {
            "x:a__b:c--d:1:80": "a__b/c--d:1",
            "x:localhost:team:app:1:80": "localhost/team/app:1",
            "x:reg-1.example%3A65535:a.b:1:80": "reg-1.example:65535/a.b:1",
            "x:a_b.c:1:80": "a_b.c:1",  # one component: a repository, not a registry
            "x:" + ":".join(["abcd"] * 51) + ":1:80": "/".join(["abcd"] * 51) + ":1",
            "x:" + "a" * 255 + ":" + "t" * 128 + ":80": "a" * 255 + ":" + "t" * 128,
        }.items():
            s = parse_route(seg)
            assert isinstance(s, JobSpec), seg
            self.assertEqual(s.ref, ref)
        longest = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253
        for seg, host in {
            "host:" + longest: longest,
            "shost:" + longest + ".": longest + ".",
            "host:xn--80ak6aa92e.example": "xn--80ak6aa92e.example",
            "shost:xn--80ak6aa92e.example": "xn--80ak6aa92e.example",
            "host:ab--c.example": "ab--c.example",  # DNS has it; only TLS names may not
            "host:[::ffff:10.0.0.1]:81": "::ffff:10.0.0.1",
        }.items():
            t = parse_route(seg)
            assert isinstance(t, HostTarget), seg
            self.assertEqual(t.host, host)

    def test_worker_env(self) -> None:
        seg = (
            "x:dockers.priberam.com:worker-sidecar:dockerspaces:3:"
            "RabbitMQ__Url=amqp%3A%2F%2F172.25.1.54%3A8672;SidecarWorker__WorkerType=FullReindexer;"
            "ReindexerSettings__Url=http%3A%2F%2Fpbanet05-22.interno.priberam.pt%3A80%2F;"
            "ReindexerSettings__Scenario=SUNSET6;InputQueue__Name=Indexer.en"
        )
        s = parse_route(seg)
        assert isinstance(s, JobSpec)
        self.assertTrue(s.worker)
        self.assertEqual(s.kind, "worker")
        env = s.env_dict
        self.assertEqual(env["RabbitMQ__Url"], "amqp://172.25.1.54:8672")
        self.assertEqual(env["ReindexerSettings__Url"], "http://pbanet05-22.interno.priberam.pt:80/")
        self.assertEqual(env["InputQueue__Name"], "Indexer.en")

    def test_env_raw_colon_plus_and_escapes(self) -> None:
        s = parse_route("y:a:1:80:URL=http://h:1/p;P=a+b;S=%3B%25;T=")
        assert isinstance(s, JobSpec)
        self.assertEqual(s.env_dict, {"URL": "http://h:1/p", "P": "a+b", "S": ";%", "T": ""})

    def test_trailing_semicolon_ignored(self) -> None:
        s = parse_route("x:a:1:80:A=1;;B=2;")
        assert isinstance(s, JobSpec)
        self.assertEqual(s.env, (("A", "1"), ("B", "2")))

    def test_host_routes(self) -> None:
        self.assertEqual(parse_route("host:example.org"), HostTarget("example.org", 80, False))
        self.assertEqual(parse_route("host:example.org:8080"), HostTarget("example.org", 8080))
        self.assertEqual(parse_route("shost:example.org"), HostTarget("example.org", 443, True))
        self.assertEqual(parse_route("host:[::1]:81"), HostTarget("::1", 81))
        t = parse_route("shost:example.org:8443")
        assert isinstance(t, HostTarget)
        self.assertEqual(t.host_header, "example.org:8443")
        t = parse_route("shost:example.org:443")
        assert isinstance(t, HostTarget)
        self.assertEqual(t.host_header, "example.org")

    def test_other_routes(self) -> None:
        self.assertEqual(parse_route("monitor:broker"), MonitorRoute("broker"))
        self.assertEqual(parse_route("docker:local"), DockerApiRoute())
        self.assertIsNone(parse_route("static"))
        self.assertIsNone(parse_route("monitor:nothing"))
        self.assertIsNone(parse_route("z:a:1:80"))
        self.assertIsNone(parse_route(""))


class Errors(SynchronousTestCase):
    """Every 400 case names the bad part and raises SpecError only."""

    cases: ClassVar[dict[str, str]] = {
        "x:a::1:80": "empty part",
        "x:a:1:80:": "trailing",
        "x:a:1:0": "bad port",
        "x:a:1:65536": "bad port",
        "x:a:1:080": "bad port",
        "x:a:1:http": "bad port",
        "x:A:1:80": "lower-case",
        "x:a:1": "needs NAME:TAG:PORT",
        "x:1:80": "needs NAME:TAG:PORT",
        "x:a:1:80:=v": "empty name",
        "x:a:1:80:A=1;A=2": "twice",
        "x:a:1:80:1A=1": "bad env name",
        "x:a:1:80:A-B=1": "bad env name",
        "x:a:1:80:NVIDIA_VISIBLE_DEVICES=all": "NVIDIA",
        "x:a:1:80:A=1;B": "no '='",
        "y:a:1:3": "port 3",
        "x:a:b%2Fc:1:80": "bad image name",
        "x:a:1%ff:80": "percent-encoded",
        "x:a:t@g:80": "bad tag",
        "host:": "empty host",
        "host:a:b": "bad port",
        "host:exa mple": "bad host",
        "host:a:": "trailing",
        # issue 12: what Docker or DNS would refuse is a 400 here, not a pull or a hang
        "host:" + "a" * 64 + ".example": "63 characters",
        "shost:" + "a" * 64: "63 characters",
        "host:" + "a." * 130 + "b": "bad host name",
        "x:" + "a" * 10_000 + ":1:80": "too long",
        "x:" + ":".join(["a"] * 3_000) + ":1:80": "too long",
        "x:" + ":".join(["abcd"] * 60) + ":1:80": "too long",
        "x:" + ":".join(["abcd"] * 52) + ":1:80": "too long",  # 259 characters
        "x:" + "%61" * 256 + ":1:80": "too long",  # 256 once decoded
        "host:" + ".".join(["a" * 63] * 4): "at most 253",
        "host:[:::::]": "not an IPv6 address",
        "host:[1::2::3]:80": "not an IPv6 address",
        "shost:xn--a.example": "not a valid IDNA label",
        "host:XN--ZZ": "not a valid IDNA label",
        "shost:ab--c.example": "not a name TLS can verify",
        "shost:xn--ls8h.example": "not a name TLS can verify",
        # a first component with '.' or ':' is a registry to Docker: a host[:port]
        "x:foo_bar.example:app:1:80": "bad registry",
        "x:registry.example%3A99999:app:1:80": "bad registry",
        "x:registry.example%3A0:app:1:80": "bad registry",
        "x:-reg.example:app:1:80": "bad registry",
    }

    def test_cases(self) -> None:
        for seg, words in self.cases.items():
            with self.subTest(seg=seg):
                e = self.assertRaises(SpecError, parse_route, seg)
                self.assertIn(words.lower(), str(e).lower(), seg)


class Keys(SynchronousTestCase):
    """The key identifies a container; its display never shows env values."""

    def test_env_is_part_of_key(self) -> None:
        a = parse_route("x:a:1:80:K=1")
        b = parse_route("x:a:1:80:K=2")
        c = parse_route("x:a:1:80")
        assert isinstance(a, JobSpec) and isinstance(b, JobSpec) and isinstance(c, JobSpec)
        self.assertNotEqual(a.key, b.key)
        self.assertNotEqual(a.key, c.key)

    def test_env_order_does_not_matter(self) -> None:
        a = parse_route("x:a:1:80:K=1;L=2")
        b = parse_route("x:a:1:80:L=2;K=1")
        assert isinstance(a, JobSpec) and isinstance(b, JobSpec)
        self.assertEqual(a.key, b.key)
        self.assertEqual(a.display, b.display)

    def test_mode_is_part_of_key(self) -> None:
        x, y = parse_route("x:a:1:80"), parse_route("y:a:1:80")
        assert isinstance(x, JobSpec) and isinstance(y, JobSpec)
        self.assertNotEqual(x.key, y.key)

    def test_display_hides_values(self) -> None:
        s = parse_route("x:selmaproject:tts:777:5002:B=secret;A=hunter2")
        assert isinstance(s, JobSpec)
        self.assertRegex(s.display, r"^x:selmaproject/tts:777:5002 env\[A,B\]#[0-9a-f]{6}$")
        self.assertNotIn("secret", s.display)
        self.assertNotIn("secret", s.key)
        self.assertNotIn("hunter2", s.key)

    def test_redacted_path(self) -> None:
        line = redact_path(b"/x:a:1:80:TOKEN=secret/p?q=1")
        self.assertNotIn("secret", line)
        self.assertIn("env[TOKEN]", line)
        self.assertTrue(line.endswith("/p?q=1"))
        self.assertNotIn("secret", redact_path(b"/x:a:1:80:TOKEN=secret;bad/p"))


class SplitUri(SynchronousTestCase):
    """Raw path splitting keeps encoding and distinguishes 'no slash'."""

    def test_split(self) -> None:
        r = split_uri(b"/x:a:1:80/rest%2F?q=%20")
        self.assertEqual((r.segment, r.rest, r.query), ("x:a:1:80", b"/rest%2F", b"q=%20"))
        self.assertEqual(r.forward_path, b"/rest%2F?q=%20")

    def test_no_slash(self) -> None:
        r = split_uri(b"/x:a:1:80?q")
        self.assertFalse(r.has_slash)
        self.assertEqual(r.forward_path, b"/?q")


_lower = st.from_regex(r"[a-z0-9]{1,8}(?:[._-][a-z0-9]{1,6}){0,2}", fullmatch=True)
_env = st.dictionaries(
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_.]{0,10}", fullmatch=True).filter(
        lambda n: not n.upper().startswith("NVIDIA_")
    ),
    st.text(max_size=20),
    max_size=4,
)


@st.composite
def job_specs(draw: st.DrawFn) -> JobSpec:
    mode = draw(st.sampled_from(["x", "y"]))
    port = draw(st.integers(1, 65535).filter(lambda p: not (mode == "y" and p == 3)))
    return JobSpec(
        mode,
        # Docker reads a first component with '.' before others as a registry (no '_')
        tuple(
            draw(
                st.lists(_lower, min_size=1, max_size=3).filter(
                    lambda n: len(n) == 1 or "." not in n[0] or "_" not in n[0]
                )
            )
        ),
        draw(st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,12}", fullmatch=True)),
        port,
        tuple(draw(_env).items()),
    )


class Properties(SynchronousTestCase):
    """Round trip through the formatter; no input raises anything but SpecError."""

    @settings(max_examples=300, deadline=None)
    @given(job_specs())
    def test_round_trip(self, spec: JobSpec) -> None:
        self.assertEqual(parse_route(spec.segment()), spec)

    @settings(max_examples=500, deadline=None)
    @given(st.text(alphabet=st.characters(codec="latin-1"), max_size=60))
    def test_never_crashes(self, text: str) -> None:
        for seg in (text, "x:" + text, "y:" + text, "host:" + text, "shost:" + text):
            try:
                parse_route(seg)
            except SpecError:
                pass

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.sampled_from(["a", "1", "80", "", "A=1", "%3A", "=", ";", "3", "b.c"]), max_size=7))
    def test_never_crashes_structured(self, parts: list[str]) -> None:
        for mode in ("x", "y"):
            try:
                parse_route(":".join([mode] + parts))
            except SpecError:
                pass
