//! The operator's image (`make image`, built without a daemon by
//! `scripts/image.py`) is what the Dockerfile's final stage says: read here
//! independently of the builder and compared item by item, so the two cannot
//! drift: the user, entrypoint, command and ports, both binaries (the very
//! release builds) at their COPY destinations, and no file beyond the
//! binaries' shared libraries, the CA bundle, /etc/passwd and /etc/group.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::support::{root, success};

/// What the Dockerfile's final stage declares.
#[derive(Debug, Default)]
struct FinalStage {
    user: String,
    entrypoint: Value,
    cmd: Value,
    expose: BTreeSet<String>,
    /// (binary name in target/release, destination in the image)
    copies: Vec<(String, String)>,
}

fn final_stage(dockerfile: &str) -> FinalStage {
    let joined = dockerfile.replace("\\\n", " ");
    let lines: Vec<&str> = joined.lines().collect();
    let last_from = lines
        .iter()
        .rposition(|l| l.trim_start().starts_with("FROM "))
        .expect("the Dockerfile has a FROM");
    let mut stage = FinalStage::default();
    for line in lines.iter().skip(last_from + 1) {
        let line = line.trim();
        let (instruction, args) = line.split_once(' ').unwrap_or((line, ""));
        match instruction {
            "USER" => stage.user = args.trim().to_owned(),
            "ENTRYPOINT" => stage.entrypoint = serde_json::from_str(args).expect("exec form"),
            "CMD" => stage.cmd = serde_json::from_str(args).expect("exec form"),
            "EXPOSE" => stage
                .expose
                .extend(args.split_whitespace().map(|p| format!("{p}/tcp"))),
            "COPY" => {
                let words: Vec<&str> = args.split_whitespace().collect();
                let (source, destination) = (words[words.len() - 2], words[words.len() - 1]);
                let binary = Path::new(source)
                    .file_name()
                    .and_then(|n| n.to_str())
                    .expect("a file name");
                stage
                    .copies
                    .push((binary.to_owned(), destination.to_owned()));
            }
            _ => {}
        }
    }
    stage
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

/// The libraries `ldd` lists for a binary.
fn libraries(binary: &Path) -> BTreeSet<String> {
    let listed = success(Command::new("ldd").arg(binary));
    listed
        .lines()
        .filter_map(|line| {
            let path = line.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/')
                .then(|| path.trim_start_matches('/').to_owned())
        })
        .collect()
}

#[test]
fn the_operator_image_is_what_the_dockerfile_says() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).expect("the Dockerfile");
    let stage = final_stage(&dockerfile);
    let archive = saleslayer_testenv::image("operator")
        .expect("make image built the operator image")
        .path();
    let unpacked = tempfile::tempdir().expect("a temporary directory");
    success(
        Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(unpacked.path()),
    );
    let read_json = |name: &str| -> Value {
        let text = std::fs::read_to_string(unpacked.path().join(name)).expect("in the archive");
        serde_json::from_str(&text).expect("JSON")
    };
    let manifest = read_json("manifest.json");
    let config = read_json(manifest[0]["Config"].as_str().expect("a config"));
    let layers = manifest[0]["Layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 1, "one layer");
    let layer = unpacked
        .path()
        .join(layers[0].as_str().expect("a layer path"));

    let image = &config["config"];
    assert_eq!(image["User"], stage.user.as_str(), "USER");
    assert_eq!(image["Entrypoint"], stage.entrypoint, "ENTRYPOINT");
    assert_eq!(image["Cmd"], stage.cmd, "CMD");
    let exposed: BTreeSet<String> = image["ExposedPorts"]
        .as_object()
        .map(|ports| ports.keys().cloned().collect())
        .unwrap_or_default();
    assert_eq!(exposed, stage.expose, "EXPOSE");

    let listing = success(Command::new("tar").arg("-tvf").arg(&layer));
    let files: BTreeSet<String> = listing
        .lines()
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| l.split_whitespace().last().map(str::to_owned))
        .collect();
    let mut allowed: BTreeSet<String> = [
        "etc/passwd",
        "etc/group",
        "etc/ssl/certs/ca-certificates.crt",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    let extracted = tempfile::tempdir().expect("a temporary directory");
    success(
        Command::new("tar")
            .arg("-xf")
            .arg(&layer)
            .arg("-C")
            .arg(extracted.path()),
    );
    for (binary, destination) in &stage.copies {
        let built = target_dir().join("release").join(binary);
        let inside = destination.trim_start_matches('/');
        assert!(files.contains(inside), "{destination} is in the image");
        assert_eq!(
            std::fs::read(&built).expect("the release binary"),
            std::fs::read(extracted.path().join(inside)).expect("the image's binary"),
            "{destination} is the release build of {binary}"
        );
        let mode = listing
            .lines()
            .find(|l| l.ends_with(inside))
            .map(|l| l.split_whitespace().next().unwrap_or_default().to_owned());
        assert_eq!(
            mode.as_deref(),
            Some("-rwxr-xr-x"),
            "{destination} is executable"
        );
        allowed.insert(inside.to_owned());
        allowed.extend(libraries(&built));
    }
    let extra: Vec<&String> = files.difference(&allowed).collect();
    assert!(
        extra.is_empty(),
        "files the Dockerfile does not put there: {extra:?}"
    );
    let missing: Vec<&String> = allowed.difference(&files).collect();
    assert!(missing.is_empty(), "files the image lacks: {missing:?}");
    let passwd = std::fs::read_to_string(extracted.path().join("etc/passwd")).expect("passwd");
    assert!(passwd.contains("nonroot:x:65532:65532:"), "{passwd}");
    println!(
        "operator image: {} files, user {}, entrypoint {}, {} MB",
        files.len(),
        stage.user,
        stage.entrypoint,
        std::fs::metadata(&archive).map(|m| m.len()).unwrap_or(0) / 1_000_000
    );
}
