//! The C library as a C program uses it: `install.sh` into a prefix, the
//! examples in `examples/c/` compiled with `cc` and `pkg-config` against
//! the installed header and library (shared and static), run, and the
//! shared-arena example run again under valgrind.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false")
}

/// Whether `tool` runs; outside CI a missing tool is a reported skip, in
/// CI a failure.
fn have(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(!in_ci(), "{tool} is required in CI");
        eprintln!(
            "SKIPPED: {tool} is not installed (apt-get install gcc pkg-config valgrind libsqlite3-dev)"
        );
    }
    found
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The prefix the library is installed in, once per test run. The build
/// has a target directory of its own: the one running this test is locked.
fn prefix() -> &'static Path {
    static PREFIX: OnceLock<PathBuf> = OnceLock::new();
    PREFIX.get_or_init(|| {
        let prefix = repo().join("target/c-abi/prefix");
        let out = Command::new("bash")
            .arg(repo().join("hugearena-c/install.sh"))
            .args(["--prefix", prefix.to_str().unwrap()])
            .env("CARGO_TARGET_DIR", repo().join("target/c-abi"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "install.sh failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        prefix
    })
}

fn pkg_config(args: &[&str]) -> Vec<String> {
    let out = Command::new("pkg-config")
        .args(args)
        .arg("hugearena")
        .env("PKG_CONFIG_PATH", prefix().join("lib/pkgconfig"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pkg-config: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Compiles `examples/c/NAME.c` (warnings are errors) into `out`.
fn compile(name: &str, out: &Path, static_link: bool, extra: &[&str]) {
    let mut cc = Command::new("cc");
    cc.args([
        "-std=c11",
        "-D_POSIX_C_SOURCE=200809L",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-O2",
        "-g",
    ])
    .arg(repo().join(format!("examples/c/{name}.c")))
    .args(pkg_config(&["--cflags"]))
    .arg("-o")
    .arg(out);
    if static_link {
        cc.arg(prefix().join("lib/libhugearena.a"));
        cc.args(pkg_config(&["--libs-only-other", "--static"]));
        // The archive's own dependencies (Libs.private) after it.
        let libs = pkg_config(&["--libs", "--static"]);
        cc.args(
            libs.iter()
                .filter(|l| *l != "-lhugearena" && !l.starts_with("-L")),
        );
    } else {
        cc.args(pkg_config(&["--libs"]));
        cc.arg(format!("-Wl,-rpath,{}", prefix().join("lib").display()));
    }
    cc.args(extra);
    let result = cc.output().unwrap();
    assert!(
        result.status.success(),
        "{cc:?}:\n{}",
        String::from_utf8_lossy(&result.stderr)
    );
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn two_processes_share_an_arena_and_a_third_restores_its_snapshot() {
    if !have("cc") || !have("pkg-config") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for static_link in [false, true] {
        let bin = dir.path().join(format!("shared_arena_{static_link}"));
        compile("shared_arena", &bin, static_link, &[]);
        let out = run(&mut Command::new(&bin));
        for line in [
            "first process: 1000 records checked",
            "second process: 1000 records checked",
            "first process, after the second: 2000 records checked",
            "restored process: 2000 records checked",
            "restored process: audit clean",
            "double free refused: hugearena_free: invalid free",
        ] {
            assert!(out.contains(line), "no {line:?} in:\n{out}");
        }
        assert!(out.trim_end().ends_with("ok"), "{out}");
    }
}

#[test]
fn the_shared_arena_example_is_valgrind_clean() {
    if !have("cc") || !have("pkg-config") || !have("valgrind") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("shared_arena");
    compile("shared_arena", &bin, false, &[]);
    let out = run(Command::new("valgrind")
        .args([
            "--error-exitcode=3",
            "--trace-children=yes",
            "--leak-check=no",
            "-q",
        ])
        .arg(&bin));
    assert!(
        out.contains("restored process: 2000 records checked"),
        "{out}"
    );
    assert!(
        !out.contains("Invalid read")
            && !out.contains("Invalid write")
            && !out.contains("uninitialised"),
        "{out}"
    );
}

#[test]
fn a_c_program_linked_with_the_system_sqlite_puts_its_page_cache_on_hugearena() {
    if !have("cc") || !have("pkg-config") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("sqlite_pcache");
    compile("sqlite_pcache", &bin, false, &["-lsqlite3"]);
    let out = run(&mut Command::new(&bin));
    assert!(out.trim_end().ends_with("ok"), "{out}");
    assert!(out.contains("page cache: "), "{out}");
}

#[test]
fn the_checked_in_header_declares_every_exported_function() {
    if !have("nm") {
        return;
    }
    let header = std::fs::read_to_string(repo().join("hugearena-c/include/hugearena.h")).unwrap();
    let out = run(Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(prefix().join("lib/libhugearena.so")));
    let exported: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .filter(|s| s.starts_with("hugearena_"))
        .collect();
    assert!(exported.len() > 30, "{exported:?}");
    for f in exported {
        assert!(
            header.contains(&format!("{f}(")),
            "{f} is exported but not in hugearena.h: regenerate it with cbindgen"
        );
    }
}
