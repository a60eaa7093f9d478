//! Room tokens as backends actually mint them: PyJWT, npm `jsonwebtoken`,
//! npm `jose` and the Rust `jsonwebtoken` crate each mint valid tokens and
//! tokens that are wrong in one way; every valid one joins the real relay
//! (`udphub serve --room-secret-file`), every wrong one is refused, each
//! for its own reason (`udphub_room_token_refused_total{reason}`), and
//! `udphub send` explains the refusal in words. The minting snippets of
//! docs/PROTOCOL.md run exactly as printed there.
//!
//! Node and its packages come from tests/run.sh (Debian's `nodejs` and
//! `npm`; `jsonwebtoken` and `jose` into `target/npm`, or wherever
//! `UDPHUB_NPM_DIR` says). Under CI a missing tool or package fails.

mod util;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use util::{spawn_relay, Client};

/// The relay's room secret, as `openssl rand -hex 32` writes it (the file
/// ends in a newline, which the relay drops).
const SECRET: &str = "4f1c7a0e9b2d8c6f3a5e7d9b1c3f5a7e9d2b4c6e8f0a1b3c5d7e9f1a3b5c7d9e";
/// Another secret: tokens signed with it are forgeries to this relay.
const OTHER: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A token and what the relay must do with it.
struct Case {
    /// Which library minted it, and how.
    who: String,
    token: String,
    /// `None`: admitted; `Some(reason)`: refused with this label.
    refused: Option<String>,
}

fn secret_file() -> PathBuf {
    let path = util::temp_path("room-secret");
    std::fs::write(&path, format!("{SECRET}\n")).unwrap();
    path
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn run(cmd: &mut Command, what: &str) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed (tests/run.sh installs what it needs): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `{"good": {who: token}, "bad": {who: [reason, token]}}` as printed by
/// a minting script, as cases.
fn cases(library: &str, printed: &[u8]) -> Vec<Case> {
    let v: Value = serde_json::from_slice(printed)
        .unwrap_or_else(|e| panic!("{library}: {e}: {}", String::from_utf8_lossy(printed)));
    let mut out = Vec::new();
    for (who, token) in v["good"].as_object().unwrap() {
        out.push(Case {
            who: format!("{library} {who}"),
            token: token.as_str().unwrap().to_string(),
            refused: None,
        });
    }
    for (who, pair) in v["bad"].as_object().unwrap() {
        out.push(Case {
            who: format!("{library} {who}"),
            token: pair[1].as_str().unwrap().to_string(),
            refused: Some(pair[0].as_str().unwrap().to_string()),
        });
    }
    out
}

const PYJWT: &str = r#"
import datetime, json, sys, time, warnings
import jwt
warnings.simplefilter("ignore")
secret, other = sys.argv[1], sys.argv[2]
room, now = "red", time.time()
utc, minutes = datetime.timezone.utc, lambda m: datetime.timedelta(minutes=m)
def enc(claims, key=secret, alg="HS256", headers=None):
    return jwt.encode(claims, key, algorithm=alg, headers=headers)
good = {
    "int exp": enc({"room": room, "exp": int(now) + 600}),
    "float exp": enc({"room": room, "exp": now + 600}),
    "datetime exp": enc({"room": room, "exp": datetime.datetime.now(tz=utc) + minutes(10)}),
    "nbf and iat": enc({"room": room, "iat": int(now), "nbf": int(now) - 30, "exp": int(now) + 600}),
    "float nbf and iat": enc({"room": room, "iat": now, "nbf": now - 1.5, "exp": now + 600.25, "sub": "ann"}),
}
bad = {
    "wrong room": ["room", enc({"room": "blue", "exp": now + 600})],
    "expired": ["expired", enc({"room": room, "exp": now - 600})],
    "expired datetime": ["expired", enc({"room": room, "exp": datetime.datetime.now(tz=utc) - minutes(60)})],
    "not yet": ["not_yet", enc({"room": room, "nbf": now + 3600, "exp": now + 7200})],
    "another key": ["signature", enc({"room": room, "exp": now + 600}, key=other)],
    "secret with its newline": ["signature", enc({"room": room, "exp": now + 600}, key=secret + "\n")],
    "HS512": ["algorithm", enc({"room": room, "exp": now + 600}, alg="HS512")],
    "exp in milliseconds": ["milliseconds", enc({"room": room, "exp": int(now * 1000) + 600000})],
    "no exp": ["no_exp", enc({"room": room})],
    "no room": ["no_room", enc({"exp": now + 600})],
    "crit": ["crit", enc({"room": room, "exp": now + 600}, headers={"crit": ["urn:example:ext"], "urn:example:ext": True})],
}
print(json.dumps({"good": good, "bad": bad}))
"#;

const NODE: &str = r#"
const jwt = require("jsonwebtoken"), jose = require("jose");
const secret = process.env.SECRET, other = process.env.OTHER;
const room = "red", now = Math.floor(Date.now() / 1000);
const bytes = (s) => new TextEncoder().encode(s);
const sj = (claims, opts = {}, key = secret) => jwt.sign(claims, key, { algorithm: "HS256", ...opts });
const jo = (claims, build, key = bytes(secret)) =>
  build(new jose.SignJWT(claims).setProtectedHeader({ alg: "HS256", typ: "JWT" })).sign(key);
(async () => {
  const good = {
    "jsonwebtoken expiresIn": sj({ room }, { expiresIn: "1h" }),
    "jsonwebtoken exp and notBefore": sj({ room, exp: now + 600 }, { notBefore: -30 }),
    "jose setIssuedAt setExpirationTime": await jo({ room }, (j) => j.setIssuedAt().setExpirationTime("1h")),
    "jose setNotBefore": await jo({ room }, (j) => j.setIssuedAt().setNotBefore(now - 30).setExpirationTime(now + 600)),
  };
  const bad = {
    "jsonwebtoken wrong room": ["room", sj({ room: "blue" }, { expiresIn: "1h" })],
    "jsonwebtoken expired": ["expired", sj({ room, exp: now - 600 })],
    "jsonwebtoken notBefore": ["not_yet", sj({ room }, { expiresIn: "2h", notBefore: "1h" })],
    "jsonwebtoken another key": ["signature", sj({ room }, { expiresIn: "1h" }, other)],
    "jsonwebtoken HS384": ["algorithm", sj({ room }, { expiresIn: "1h", algorithm: "HS384" })],
    "jsonwebtoken no exp": ["no_exp", sj({ room })],
    "jsonwebtoken Date.now()": ["milliseconds", sj({ room, exp: Date.now() + 3600000 })],
    "jose wrong room": ["room", await jo({ room: "blue" }, (j) => j.setExpirationTime("1h"))],
    "jose expired": ["expired", await jo({ room }, (j) => j.setIssuedAt(now - 7200).setExpirationTime(now - 3600))],
    "jose not yet": ["not_yet", await jo({ room }, (j) => j.setNotBefore("1h").setExpirationTime("2h"))],
    "jose another key": ["signature", await jo({ room }, (j) => j.setExpirationTime("1h"), bytes(other))],
  };
  console.log(JSON.stringify({ good, bad }));
})().catch((e) => { console.error(e); process.exit(1); });
"#;

/// Where tests/run.sh put the npm packages.
fn node_modules() -> PathBuf {
    std::env::var_os("UDPHUB_NPM_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/npm"))
        .join("node_modules")
}

/// Whether node, npm and both packages are there; under CI their absence
/// fails the test.
fn node_ready() -> bool {
    if !util::require_tool("node") || !util::require_tool("npm") {
        return false;
    }
    for package in ["jsonwebtoken", "jose"] {
        if !node_modules().join(package).join("package.json").exists() {
            if std::env::var_os("CI").is_some() {
                panic!(
                    "npm package {package} is required under CI in {} (tests/run.sh installs it)",
                    node_modules().display()
                );
            }
            eprintln!("skipping: npm package {package} not installed (tests/run.sh installs it)");
            return false;
        }
    }
    true
}

fn node() -> Command {
    let mut cmd = Command::new("node");
    cmd.env("NODE_PATH", node_modules());
    cmd
}

fn python_ready() -> bool {
    if !util::require_tool("python3") {
        return false;
    }
    let has_jwt = Command::new("python3")
        .args(["-c", "import jwt"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_jwt {
        assert!(
            std::env::var_os("CI").is_none(),
            "PyJWT is required under CI (tests/run.sh installs it)"
        );
        eprintln!("skipping: PyJWT not installed (tests/run.sh installs it)");
    }
    has_jwt
}

/// Tokens from the Rust `jsonwebtoken` crate.
fn rust_cases() -> Vec<Case> {
    use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
    let now = now();
    let mint = |claims: Value, alg: Algorithm, key: &str| {
        encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(key.as_bytes()),
        )
        .unwrap()
    };
    let hs = Algorithm::HS256;
    let case = |who: &str, refused: Option<&str>, token: String| Case {
        who: format!("jsonwebtoken (Rust) {who}"),
        token,
        refused: refused.map(str::to_string),
    };
    vec![
        case(
            "exp",
            None,
            mint(json!({"room": "red", "exp": now + 600}), hs, SECRET),
        ),
        case(
            "float exp, nbf, iat",
            None,
            mint(
                json!({"room": "red", "exp": now as f64 + 600.5, "nbf": now - 10, "iat": now as f64 - 0.25}),
                hs,
                SECRET,
            ),
        ),
        case(
            "wrong room",
            Some("room"),
            mint(json!({"room": "blue", "exp": now + 600}), hs, SECRET),
        ),
        case(
            "expired",
            Some("expired"),
            mint(json!({"room": "red", "exp": now - 600}), hs, SECRET),
        ),
        case(
            "not yet",
            Some("not_yet"),
            mint(
                json!({"room": "red", "exp": now + 7200, "nbf": now + 3600}),
                hs,
                SECRET,
            ),
        ),
        case(
            "another key",
            Some("signature"),
            mint(json!({"room": "red", "exp": now + 600}), hs, OTHER),
        ),
        case(
            "HS512",
            Some("algorithm"),
            mint(
                json!({"room": "red", "exp": now + 600}),
                Algorithm::HS512,
                SECRET,
            ),
        ),
    ]
}

/// Every library's valid tokens join through the real relay; every wrong
/// one is refused `^denied^token`, counted under its own reason.
#[test]
fn tokens_from_four_jwt_libraries_join_or_are_refused_for_the_right_reason() {
    let python = python_ready();
    let node_ok = node_ready();
    let mut all = rust_cases();
    if python {
        let out = run(
            Command::new("python3").args(["-c", PYJWT, SECRET, OTHER]),
            "PyJWT",
        );
        all.extend(cases("PyJWT", &out.stdout));
    }
    if node_ok {
        let out = run(
            node()
                .args(["-e", NODE])
                .env("SECRET", SECRET)
                .env("OTHER", OTHER),
            "node",
        );
        all.extend(cases("npm", &out.stdout));
    }
    let secret = secret_file();
    let relay = spawn_relay(&["--room-secret-file", secret.to_str().unwrap()]);
    let mut counted: BTreeMap<String, f64> = BTreeMap::new();
    for case in &all {
        let client = Client::new(relay.addr);
        client.send(format!("^join^red^{}", case.token).as_bytes());
        let answer = String::from_utf8_lossy(&client.recv()).into_owned();
        match &case.refused {
            None => assert_eq!(answer, "^room^red", "{}: {}", case.who, case.token),
            Some(reason) => {
                assert_eq!(answer, "^denied^token", "{}: {}", case.who, case.token);
                // Refused for this reason, not another: its own count
                // moves (the wait fails with the whole scrape otherwise).
                let n = counted.entry(reason.clone()).or_default();
                *n += 1.0;
                relay.wait_metric(
                    &format!("udphub_room_token_refused_total{{reason=\"{reason}\"}}"),
                    *n,
                );
            }
        }
    }
    let scrape = relay.scrape();
    for (reason, n) in &counted {
        let series = format!("udphub_room_token_refused_total{{reason=\"{reason}\"}}");
        assert_eq!(util::metric(&scrape, &series), *n, "{series}\n{scrape}");
    }
    let refused: f64 = counted.values().sum();
    assert_eq!(
        util::metric(&scrape, "udphub_room_join_refused_total{reason=\"token\"}"),
        refused
    );
    assert_eq!(
        util::metric_sum(&scrape, "udphub_room_token_refused_total"),
        refused
    );
    let admitted = all.iter().filter(|c| c.refused.is_none()).count();
    assert_eq!(
        util::metric(&scrape, "udphub_room_joins_total"),
        admitted as f64
    );
    // Nothing silently missing: under CI all four libraries ran.
    if std::env::var_os("CI").is_some() {
        for library in [
            "PyJWT",
            "npm jsonwebtoken",
            "npm jose",
            "jsonwebtoken (Rust)",
        ] {
            assert!(all.iter().any(|c| c.who.starts_with(library)), "{library}");
        }
    }
}

/// The fenced ```LANG block that follows `after` in docs/PROTOCOL.md.
fn doc_snippet(lang: &str, after: &str) -> String {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md")).unwrap();
    let section = &doc[doc.find(after).expect("the section")..];
    let fence = format!("```{lang}\n");
    let start = section.find(&fence).expect("the snippet") + fence.len();
    let len = section[start..].find("```").expect("its end");
    section[start..start + len].to_string()
}

/// `udphub send --room red --token T`, returning its exit code and stderr.
fn send(relay: &util::RelayProc, room: &str, token: &str) -> (Option<i32>, String) {
    let out = Command::new(util::udphub_bin())
        .args([
            "send",
            "--server",
            &relay.addr.to_string(),
            "--room",
            room,
            "--token",
            token,
            "--wait",
            "100ms",
            "hi",
        ])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// docs/PROTOCOL.md's Python and Node snippets, run exactly as printed,
/// mint tokens that join; `udphub send` takes a fractional `exp` and says
/// in words why each wrong token is refused.
#[test]
fn the_documented_snippets_mint_tokens_that_join_and_send_explains_refusals() {
    let secret = secret_file();
    let relay = spawn_relay(&["--room-secret-file", secret.to_str().unwrap()]);
    let mut minted = Vec::new();
    if python_ready() {
        let code = doc_snippet("python", "### Room tokens");
        let out = run(
            Command::new("python3")
                .args(["-c", &code])
                .env("UDPHUB_ROOM_SECRET_FILE", &secret),
            "the PROTOCOL.md Python snippet",
        );
        minted.push(("python", String::from_utf8(out.stdout).unwrap()));
    }
    if node_ready() {
        let code = doc_snippet("js", "### Room tokens");
        let out = run(
            node()
                .args(["-e", &code])
                .env("UDPHUB_ROOM_SECRET_FILE", &secret),
            "the PROTOCOL.md Node snippet",
        );
        minted.push(("node", String::from_utf8(out.stdout).unwrap()));
    }
    for (who, token) in &minted {
        let token = token.trim();
        let client = Client::new(relay.addr);
        client.send(format!("^join^ops^{token}").as_bytes());
        assert_eq!(client.recv(), b"^room^ops", "{who}: {token}");
        let (code, err) = send(&relay, "ops", token);
        assert_eq!(code, Some(0), "{who}: {err}");
    }

    // What `udphub send` says about each kind of wrong token: the cause,
    // never "not a JWT" for a JWT.
    let now = now();
    let mint = |claims: Value, key: &str| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(key.as_bytes()),
        )
        .unwrap()
    };
    let ok = mint(json!({"room": "red", "exp": now as f64 + 600.379}), SECRET);
    let (code, err) = send(&relay, "red", &ok);
    assert_eq!(code, Some(0), "a fractional exp: {err}");
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &json!({"room": "red", "exp": now + 600}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let with_newline = format!("{SECRET}\n");
    for (token, says) in [
        (
            mint(json!({"room": "red", "exp": now as f64 - 600.5}), SECRET),
            vec!["expired 10m"],
        ),
        (
            mint(
                json!({"room": "red", "exp": now + 7200, "nbf": now as f64 + 3600.5}),
                SECRET,
            ),
            vec!["not valid for another", "nbf"],
        ),
        (
            mint(json!({"room": "blue", "exp": now + 600}), SECRET),
            vec!["for room \"blue\", not \"red\""],
        ),
        (
            mint(json!({"room": "red", "exp": now + 600}), &with_newline),
            vec!["not signed with the relay's room secret", "newline"],
        ),
        (mint(json!({"room": "red"}), SECRET), vec!["no `exp` claim"]),
        (
            mint(json!({"exp": now + 600}), SECRET),
            vec!["no `room` claim"],
        ),
        (
            mint(json!({"room": "red", "exp": (now + 600) * 1000}), SECRET),
            vec!["milliseconds", "divide by 1000"],
        ),
        (hs512, vec!["not signed with HS256"]),
    ] {
        let (code, err) = send(&relay, "red", &token);
        assert_eq!(code, Some(1), "{err}");
        for s in says {
            assert!(err.contains(s), "{s:?} not in {err}");
        }
        assert!(!err.contains("not a JWT"), "{err}");
    }
}

/// A relay without a room secret admits any token: it counts that and
/// logs it once, and `udphub chat --token` and `udphub send --token` warn
/// that the room is not private; with a secret, both join quietly.
#[test]
fn a_token_to_a_relay_without_a_secret_is_counted_logged_and_warned_about() {
    let relay = spawn_relay(&[]);
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"room": "red", "exp": now() + 600}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let server = relay.addr.to_string();
    let chat = util::proc::Proc::spawn(&[
        "chat", "--server", &server, "--room", "red", "--token", &token, "--linger", "0s",
    ]);
    relay.wait_metric("udphub_clients", 1.0);
    let (code, err) = chat.wait();
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("not private") && err.contains("--room-secret-file"),
        "{err}"
    );
    for _ in 0..3 {
        let c = Client::new(relay.addr);
        c.send(format!("^join^red^{token}").as_bytes());
        assert_eq!(c.recv(), b"^room^red");
    }
    // chat's token was never looked at (it asked without one first, and
    // was let in): the three joins above.
    relay.wait_metric("udphub_room_tokens_ignored_total", 3.0);
    relay.expect_log("no --room-secret-file: tokens are not checked");
    // `send` says the same, in the same words, and still sends.
    let (code, err) = send(&relay, "red", &token);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("the room is not private") && err.contains("set --room-secret-file"),
        "{err}"
    );

    let secret = secret_file();
    let private = spawn_relay(&["--room-secret-file", secret.to_str().unwrap()]);
    let chat = util::proc::Proc::spawn(&[
        "chat",
        "--server",
        &private.addr.to_string(),
        "--room",
        "red",
        "--token",
        &token,
        "--linger",
        "0s",
    ]);
    private.wait_metric("udphub_room_joins_total", 1.0);
    let (code, err) = chat.wait();
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("not private"), "{err}");
    let (code, err) = send(&private, "red", &token);
    assert_eq!(code, Some(0), "{err}");
    assert!(!err.contains("not private"), "{err}");
}
