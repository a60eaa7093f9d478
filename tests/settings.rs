//! Every setting of `udphub serve` through every source, through the real
//! binary: its default, the `--config` file, its environment variable and
//! its flag, alone and stacked — flag > environment > file > default, for
//! every type — read back from `serve --check-config`. And the settings
//! table in docs/OPERATIONS.md is the declarations, verbatim.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use udphub::config::settings::ALL;

/// One walk of a setting through the sources: three different values, as
/// the file writes it, as the environment and as the flag do, and what
/// `--check-config` shows for each.
struct Row {
    /// The setting's key (and flag name).
    key: &'static str,
    /// What `--check-config` shows with no source at all (`None`: it varies,
    /// as the node id's process id does).
    default: Option<&'static str>,
    /// The file's value (TOML), and what it shows.
    file: (&'static str, &'static str),
    /// The environment variable's value, and what it shows.
    env: (&'static str, &'static str),
    /// The flag as written (`--no-echo`, `--no-echo=false`, or the value
    /// after `--KEY`), and what it shows.
    flag: (Flag, &'static str),
    /// Other flags the setting needs to be valid (a cluster for its name).
    needs: &'static [&'static str],
}

/// How a row gives its flag.
#[derive(Clone, Copy)]
enum Flag {
    /// `--KEY VALUE`.
    Value(&'static str),
    /// `--KEY` alone (a yes-or-no setting).
    Bare,
    /// `--KEY=VALUE`.
    Equals(&'static str),
}

/// The rows: every declared setting at least once; the yes-or-no ones
/// three times, so that each pair of sources is seen disagreeing.
fn rows(files: &Files) -> Vec<Row> {
    let s = |p: &PathBuf| -> &'static str { Box::leak(p.display().to_string().into_boxed_str()) };
    let quoted = |p: &PathBuf| -> &'static str {
        Box::leak(format!("{:?}", p.display().to_string()).into_boxed_str())
    };
    let cluster: &'static [&'static str] = &["--cluster", "nats://127.0.0.1:4000"];
    let secret: &'static [&'static str] =
        Box::leak(Box::new(["--room-secret-file", s(&files.secrets[0])]));
    let mut rows = vec![
        Row {
            key: "bind",
            default: Some("127.0.0.1:9999"),
            file: ("\"127.0.0.1:1001\"", "127.0.0.1:1001"),
            env: ("127.0.0.1:1002", "127.0.0.1:1002"),
            flag: (Flag::Value("[::1]:1003"), "[::1]:1003"),
            needs: &[],
        },
        Row {
            key: "metrics",
            default: Some("127.0.0.1:9898"),
            file: ("\"off\"", "off"),
            env: ("127.0.0.1:1012", "127.0.0.1:1012"),
            flag: (Flag::Value("127.0.0.1:1013"), "127.0.0.1:1013"),
            needs: &[],
        },
        Row {
            key: "timeout",
            default: Some("10s"),
            file: ("\"3s\"", "3s"),
            env: ("500ms", "500ms"),
            flag: (Flag::Value("2m"), "2m"),
            needs: &[],
        },
        Row {
            key: "timeout",
            default: Some("10s"),
            file: ("30", "30s"),
            env: ("0.25", "250ms"),
            flag: (Flag::Equals("1h 30m"), "1h 30m"),
            needs: &[],
        },
        Row {
            key: "format",
            default: Some("\"{body}. from {ip}:{port}\""),
            file: ("\"raw\"", "\"{body}\""),
            env: ("<{body}>", "\"<{body}>\""),
            flag: (Flag::Value("{body}!"), "\"{body}!\""),
            needs: &[],
        },
        Row {
            key: "max-datagram",
            default: Some("1472"),
            file: ("100", "100"),
            env: ("200", "200"),
            flag: (Flag::Value("300"), "300"),
            needs: &[],
        },
        Row {
            key: "max-clients",
            default: Some("1000000"),
            file: ("5", "5"),
            env: ("6", "6"),
            flag: (Flag::Value("7"), "7"),
            needs: &[],
        },
        Row {
            key: "expect-clients",
            default: Some("0"),
            file: ("10", "10"),
            env: ("20", "20"),
            flag: (Flag::Value("30"), "30"),
            needs: &[],
        },
        Row {
            key: "recv-buffer",
            default: Some("8388608"),
            file: ("65536", "65536"),
            env: ("131072", "131072"),
            flag: (Flag::Value("262144"), "262144"),
            needs: &[],
        },
        Row {
            key: "send-buffer",
            default: Some("8388608"),
            file: ("65536", "65536"),
            env: ("131072", "131072"),
            flag: (Flag::Value("262144"), "262144"),
            needs: &[],
        },
        Row {
            key: "send-backlog",
            default: Some("16777216"),
            file: ("65536", "65536"),
            env: ("131072", "131072"),
            flag: (Flag::Value("262144"), "262144"),
            needs: &[],
        },
        Row {
            key: "fanout-slice",
            default: Some("4096"),
            file: ("64", "64"),
            env: ("128", "128"),
            flag: (Flag::Value("256"), "256"),
            needs: &[],
        },
        Row {
            key: "log-level",
            default: Some("info"),
            file: ("\"warn\"", "warn"),
            env: ("error", "error"),
            flag: (Flag::Value("udphub=warn"), "udphub=warn"),
            needs: &[],
        },
        Row {
            key: "log-format",
            default: Some("text"),
            file: ("\"json\"", "json"),
            env: ("text", "text"),
            flag: (Flag::Value("json"), "json"),
            needs: &[],
        },
        Row {
            key: "max-rooms",
            default: Some("100000"),
            file: ("1", "1"),
            env: ("2", "2"),
            flag: (Flag::Value("3"), "3"),
            needs: &[],
        },
        Row {
            key: "max-room-clients",
            default: Some("100000"),
            file: ("1", "1"),
            env: ("2", "2"),
            flag: (Flag::Value("3"), "3"),
            needs: &[],
        },
        Row {
            key: "room-secret-file",
            default: Some("none"),
            file: (quoted(&files.secrets[0]), s(&files.secrets[0])),
            env: (s(&files.secrets[1]), s(&files.secrets[1])),
            flag: (Flag::Value(s(&files.secrets[2])), s(&files.secrets[2])),
            needs: &[],
        },
        Row {
            key: "lobby",
            default: Some("open"),
            file: ("\"closed\"", "closed"),
            env: ("open", "open"),
            flag: (Flag::Value("closed"), "closed"),
            needs: secret,
        },
        Row {
            key: "cookie-rate",
            default: Some("20"),
            file: ("1.5", "1.5"),
            env: ("2", "2"),
            flag: (Flag::Value("2.5"), "2.5"),
            needs: &[],
        },
        Row {
            key: "client-rate",
            default: Some("no limit"),
            file: ("10", "10"),
            env: ("20.5", "20.5"),
            flag: (Flag::Value("30"), "30"),
            needs: &[],
        },
        Row {
            key: "client-burst",
            default: Some("twice the rate"),
            file: ("5", "5"),
            env: ("6", "6"),
            flag: (Flag::Value("7"), "7"),
            needs: &[],
        },
        Row {
            key: "max-clients-per-ip",
            default: Some("no limit"),
            file: ("1", "1"),
            env: ("2", "2"),
            flag: (Flag::Value("3"), "3"),
            needs: &[],
        },
        Row {
            key: "cluster",
            default: Some("none"),
            file: ("\"nats://127.0.0.1:4001\"", "nats://127.0.0.1:4001"),
            env: ("127.0.0.1:4002", "nats://127.0.0.1:4002"),
            flag: (
                Flag::Value("nats://127.0.0.1:4003,nats://127.0.0.1:4004"),
                "nats://127.0.0.1:4003,nats://127.0.0.1:4004",
            ),
            needs: &[],
        },
        Row {
            key: "cluster-name",
            default: Some("udphub"),
            file: ("\"eu\"", "eu"),
            env: ("us", "us"),
            flag: (Flag::Value("ap.south"), "ap.south"),
            needs: cluster,
        },
        Row {
            key: "node-id",
            default: None,
            file: ("\"a\"", "a"),
            env: ("b", "b"),
            flag: (Flag::Value("c"), "c"),
            needs: cluster,
        },
        Row {
            key: "cluster-credentials",
            default: Some("none"),
            file: (quoted(&files.secrets[0]), s(&files.secrets[0])),
            env: (s(&files.secrets[1]), s(&files.secrets[1])),
            flag: (Flag::Value(s(&files.secrets[2])), s(&files.secrets[2])),
            needs: cluster,
        },
        Row {
            key: "cluster-ca",
            default: Some("the system's CAs"),
            file: (quoted(&files.certs[0]), s(&files.certs[0])),
            env: (s(&files.certs[1]), s(&files.certs[1])),
            flag: (Flag::Value(s(&files.certs[2])), s(&files.certs[2])),
            needs: cluster,
        },
        Row {
            key: "cluster-cert",
            default: Some("none"),
            file: (quoted(&files.certs[0]), s(&files.certs[0])),
            env: (s(&files.certs[1]), s(&files.certs[1])),
            flag: (Flag::Value(s(&files.certs[2])), s(&files.certs[2])),
            needs: cluster,
        },
        Row {
            key: "cluster-cert-key",
            default: Some("none"),
            file: (quoted(&files.keys[0]), s(&files.keys[0])),
            env: (s(&files.keys[1]), s(&files.keys[1])),
            flag: (Flag::Value(s(&files.keys[2])), s(&files.keys[2])),
            needs: Box::leak(Box::new([
                "--cluster",
                "nats://127.0.0.1:4000",
                "--cluster-cert",
                s(&files.certs[0]),
            ])),
        },
        Row {
            key: "cluster-key-file",
            default: Some("none"),
            file: (quoted(&files.secrets[0]), s(&files.secrets[0])),
            env: (s(&files.secrets[1]), s(&files.secrets[1])),
            flag: (Flag::Value(s(&files.secrets[2])), s(&files.secrets[2])),
            needs: cluster,
        },
        Row {
            key: "threads",
            default: Some("1"),
            file: ("2", "2"),
            env: ("3", "3"),
            flag: (Flag::Value("4"), "4"),
            needs: &[],
        },
        Row {
            key: "ready-file",
            default: Some("none"),
            file: (quoted(&files.ready[0]), s(&files.ready[0])),
            env: (s(&files.ready[1]), s(&files.ready[1])),
            flag: (Flag::Value(s(&files.ready[2])), s(&files.ready[2])),
            needs: &[],
        },
        // Paths only: `--check-config` binds no control socket either.
        Row {
            key: "control",
            default: Some("none"),
            file: (quoted(&files.ready[0]), s(&files.ready[0])),
            env: (s(&files.ready[1]), s(&files.ready[1])),
            flag: (Flag::Value(s(&files.ready[2])), s(&files.ready[2])),
            needs: &[],
        },
    ];
    // Yes-or-no settings: each pair of sources disagrees in one of the
    // three, and an explicit false always beats a lower true.
    for key in ["no-echo", "verify-sources", "public", "pin-threads"] {
        rows.push(Row {
            key,
            default: Some("false"),
            file: ("true", "true"),
            env: ("0", "false"),
            flag: (Flag::Bare, "true"),
            needs: &[],
        });
        rows.push(Row {
            key,
            default: Some("false"),
            file: ("false", "false"),
            env: ("yes", "true"),
            flag: (Flag::Equals("false"), "false"),
            needs: &[],
        });
        rows.push(Row {
            key,
            default: Some("false"),
            file: ("true", "true"),
            env: ("on", "true"),
            flag: (Flag::Value("false"), "false"),
            needs: &[],
        });
    }
    rows
}

/// Files the rows point at.
struct Files {
    /// Three room secrets (32 bytes or more), also used as credentials.
    secrets: Vec<PathBuf>,
    /// Three ready-file paths (not written: `--check-config` binds nothing).
    ready: Vec<PathBuf>,
    /// Three certificates (PEM, self-signed, so each is also a CA) of one
    /// key, each followed by the key (a combined PEM), and three copies of
    /// that key: any of them goes with any certificate, whichever source
    /// wins.
    certs: Vec<PathBuf>,
    /// The key's copies.
    keys: Vec<PathBuf>,
}

/// Runs the openssl CLI in `dir` (tests/run.sh installs it).
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("openssl is needed (tests/run.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Files {
    fn new(dir: &Path) -> Files {
        std::fs::create_dir_all(dir).unwrap();
        let secrets = (0..3)
            .map(|i| {
                let p = dir.join(format!("secret-{i}"));
                std::fs::write(&p, format!("{}\n", "s".repeat(32 + i))).unwrap();
                p
            })
            .collect();
        let ready = (0..3).map(|i| dir.join(format!("ready-{i}"))).collect();
        openssl(
            dir,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "key-0.pem",
            ],
        );
        for i in 0..3 {
            let (cert, subj) = (format!("cert-{i}.pem"), format!("/CN=udphub settings {i}"));
            openssl(
                dir,
                &[
                    "req",
                    "-x509",
                    "-key",
                    "key-0.pem",
                    "-days",
                    "2",
                    "-subj",
                    &subj,
                    "-out",
                    &cert,
                ],
            );
            if i > 0 {
                std::fs::copy(dir.join("key-0.pem"), dir.join(format!("key-{i}.pem"))).unwrap();
            }
            // The key after the certificate: a combined PEM needs no
            // --cluster-cert-key.
            let mut combined = std::fs::read(dir.join(&cert)).unwrap();
            combined.extend(std::fs::read(dir.join("key-0.pem")).unwrap());
            std::fs::write(dir.join(&cert), combined).unwrap();
        }
        let certs = (0..3).map(|i| dir.join(format!("cert-{i}.pem"))).collect();
        let keys = (0..3).map(|i| dir.join(format!("key-{i}.pem"))).collect();
        Files {
            secrets,
            ready,
            certs,
            keys,
        }
    }
}

/// Runs `udphub serve --check-config` with `args`, the environment `env`
/// (and no other `UDPHUB_*` variable) and, if given, a config file holding
/// `file`; returns every setting's shown value by key.
fn check(
    dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    file: Option<&str>,
) -> HashMap<String, String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_udphub"));
    cmd.args(["serve", "--check-config"]).args(args);
    for (name, _) in std::env::vars() {
        if name.starts_with("UDPHUB_") {
            cmd.env_remove(name);
        }
    }
    cmd.envs(env.iter().copied());
    if let Some(text) = file {
        let path = dir.join("udphub.toml");
        std::fs::write(&path, text).unwrap();
        cmd.arg("--config").arg(path);
    }
    let out = cmd.stdin(Stdio::null()).output().expect("run udphub");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{args:?} {env:?} {file:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .trim_end()
        .split_once("the configuration is valid: ")
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("no summary: {stdout}"));
    line.split(", ")
        .filter_map(|pair| pair.split_once(' '))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Every setting from every source, alone and stacked: the highest source
/// present wins, whatever the type.
#[test]
fn every_setting_through_every_source_flag_env_file_default() {
    let dir = std::env::temp_dir().join(format!("udphub-test-settings-{}", std::process::id()));
    let files = Files::new(&dir);
    let rows = rows(&files);
    let mut walked: Vec<&str> = rows.iter().map(|r| r.key).collect();
    walked.sort_unstable();
    walked.dedup();
    let mut declared: Vec<String> = ALL.iter().map(|s| s.key()).collect();
    declared.sort_unstable();
    assert_eq!(walked, declared, "a setting without a row here");

    for row in &rows {
        let setting = ALL.iter().find(|s| s.key() == row.key).unwrap();
        let file = format!("{} = {}\n", row.key, row.file.0);
        let env = (setting.env, row.env.0);
        let long = format!("--{}", row.key);
        let equals;
        let flag: Vec<&str> = match row.flag.0 {
            Flag::Value(v) => vec![long.as_str(), v],
            Flag::Bare => vec![long.as_str()],
            Flag::Equals(v) => {
                equals = format!("{long}={v}");
                vec![equals.as_str()]
            }
        };
        // (flag?, env?, file?) → what wins.
        let cases: [(bool, bool, bool, Option<&str>); 8] = [
            (false, false, false, row.default),
            (false, false, true, Some(row.file.1)),
            (false, true, false, Some(row.env.1)),
            (true, false, false, Some(row.flag.1)),
            (false, true, true, Some(row.env.1)),
            (true, false, true, Some(row.flag.1)),
            (true, true, false, Some(row.flag.1)),
            (true, true, true, Some(row.flag.1)),
        ];
        for (use_flag, use_env, use_file, want) in cases {
            let mut args: Vec<&str> = row.needs.to_vec();
            if use_flag {
                args.extend(&flag);
            }
            let envs: &[(&str, &str)] = if use_env { &[env] } else { &[] };
            let shown = check(&dir, &args, envs, use_file.then_some(file.as_str()));
            let got = shown
                .get(row.key)
                .unwrap_or_else(|| panic!("{} missing from {shown:?}", row.key));
            if let Some(want) = want {
                assert_eq!(
                    got, want,
                    "{}: flag {use_flag}, env {use_env}, file {use_file}",
                    row.key
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `public = true` presets verify mode and the limits, below anything set
/// on its own: `verify-sources = false` keeps the limits without verify
/// mode, and the environment's `UDPHUB_PUBLIC=0` turns the preset off.
#[test]
fn public_presets_what_nothing_else_sets() {
    let dir = std::env::temp_dir().join(format!("udphub-test-public-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let shown = check(&dir, &[], &[], Some("public = true\n"));
    assert_eq!(shown["verify-sources"], "true");
    assert_eq!(shown["client-rate"], "200");
    assert_eq!(shown["max-clients-per-ip"], "64");
    let shown = check(
        &dir,
        &[],
        &[],
        Some("public = true\nverify-sources = false\n"),
    );
    assert_eq!(shown["verify-sources"], "false");
    assert_eq!(shown["client-rate"], "200");
    assert_eq!(shown["max-clients-per-ip"], "64");
    let shown = check(
        &dir,
        &["--client-rate", "5"],
        &[("UDPHUB_MAX_CLIENTS_PER_IP", "9")],
        Some("public = true\n"),
    );
    assert_eq!(shown["verify-sources"], "true");
    assert_eq!(shown["client-rate"], "5");
    assert_eq!(shown["max-clients-per-ip"], "9");
    let shown = check(
        &dir,
        &[],
        &[("UDPHUB_PUBLIC", "0")],
        Some("public = true\n"),
    );
    assert_eq!(shown["public"], "false");
    assert_eq!(shown["verify-sources"], "false");
    assert_eq!(shown["client-rate"], "no limit");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The settings table in docs/OPERATIONS.md is the one the declarations
/// make: every setting, with its flag, environment variable, file key,
/// default and reloadability. `UDPHUB_BLESS=1 cargo test --test settings`
/// writes it there after a change.
#[test]
fn operations_md_lists_exactly_the_declared_settings() {
    const BEGIN: &str = "<!-- settings table: generated from src/config/settings.rs; `UDPHUB_BLESS=1 cargo test --test settings` rewrites it -->\n";
    const END: &str = "<!-- end of settings table -->";
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/OPERATIONS.md");
    let docs = std::fs::read_to_string(&path).unwrap();
    let table = udphub::config::summary::markdown_table();
    let start = docs.find(BEGIN).expect("the table's opening marker") + BEGIN.len();
    let end = start + docs[start..].find(END).expect("the table's closing marker");
    if std::env::var_os("UDPHUB_BLESS").is_some() {
        let updated = format!("{}{table}{}", &docs[..start], &docs[end..]);
        std::fs::write(&path, updated).unwrap();
        return;
    }
    assert!(
        docs[start..end] == table,
        "docs/OPERATIONS.md's settings table is not the declarations' (run UDPHUB_BLESS=1 cargo test --test settings); it should be:\n{table}"
    );
}
