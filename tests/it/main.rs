//! End-to-end: the real `flowgen` binary on a model directory made by `flowgen model init-random`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use flowgen_engine::image::Image;

mod redis;
mod server;

/// The `flowgen` binary of this build, rebuilt once per test run so it is never stale
/// (cargo does not rebuild another package's binary for this test crate).
fn flowgen_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            // target/<profile>/deps/it-<hash> -> target/<profile>/flowgen
            let exe = std::env::current_exe().unwrap();
            let dir = exe.parent().and_then(Path::parent).unwrap();
            let release = dir.file_name().is_some_and(|n| n == "release");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut build = Command::new(cargo);
            build.args(["build", "--quiet", "-p", "flowgen-cli", "--bin", "flowgen"]);
            if release {
                build.arg("--release");
            }
            let status = build.status().unwrap();
            assert!(status.success(), "building the flowgen binary failed");
            let bin = dir.join(format!("flowgen{}", std::env::consts::EXE_SUFFIX));
            assert!(bin.exists(), "{} was not built", bin.display());
            bin
        })
        .clone()
}

fn flowgen(args: &[&str]) -> Output {
    Command::new(flowgen_bin()).args(args).env_remove("FLOWGEN_MODEL").output().unwrap()
}

fn random_model(dir: &Path) -> String {
    let model = dir.join("model");
    let out = flowgen(&["model", "init-random", "--out", model.to_str().unwrap(), "--seed", "5"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    model.to_str().unwrap().to_string()
}

fn assert_clean_failure(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, got success: {stderr}");
    assert!(stderr.contains("error:") && stderr.contains(needle), "stderr lacks {needle:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn generate_writes_pngs_grid_and_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(tmp.path());
    let out_dir = tmp.path().join("out");
    let out = flowgen(&[
        "generate",
        "--model",
        &model,
        "--label",
        "0-9",
        "--label",
        "seven",
        "--n",
        "12",
        "--seed",
        "7",
        "--sampler",
        "rk4",
        "--steps",
        "3",
        "--guidance",
        "2",
        "--batch-size",
        "5",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("generated 12 images") && stdout.contains("images/s"), "{stdout}");

    let manifest = read_manifest(&out_dir);
    let images = manifest["images"].as_array().unwrap();
    assert_eq!(images.len(), 12);
    let labels: Vec<u64> = images.iter().map(|e| e["label"].as_u64().unwrap()).collect();
    assert_eq!(labels, vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 7, 0]);
    assert_eq!(images[3]["seed"], 10);
    assert_eq!(images[3]["file"], "003.png");
    assert_eq!(images[3]["sampler"], "rk4");
    assert_eq!(images[3]["steps"], 3);
    assert_eq!(images[3]["nfe"], 12);

    let (png, text) = Image::from_png(&std::fs::read(out_dir.join("003.png")).unwrap()).unwrap();
    assert_eq!((png.width, png.height, png.channels), (28, 28, 1));
    let meta = |k: &str| text.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).unwrap();
    assert_eq!(
        (meta("seed"), meta("label"), meta("sampler"), meta("nfe")),
        ("10".into(), "3".into(), "rk4".into(), "12".into())
    );
    assert_eq!(meta("guidance"), "2");
    let (grid, _) = Image::from_png(&std::fs::read(out_dir.join("grid.png")).unwrap()).unwrap();
    assert!(grid.width > 4 * 28 && grid.height > 3 * 28);

    // The same image alone (batch of 1, n = 1, starting at its seed) matches pixel for pixel (+-1).
    let single_dir = tmp.path().join("single");
    let out = flowgen(&[
        "generate",
        "--model",
        &model,
        "--label",
        "3",
        "--n",
        "1",
        "--seed",
        "10",
        "--sampler",
        "rk4",
        "--steps",
        "3",
        "--guidance",
        "2",
        "--batch-size",
        "1",
        "--out",
        single_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let (alone, _) = Image::from_png(&std::fs::read(single_dir.join("000.png")).unwrap()).unwrap();
    let worst = alone.pixels.iter().zip(&png.pixels).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(worst <= 1, "pixels differ by {worst}");
}

#[test]
fn defaults_come_from_model_toml_and_the_default_model_env() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(tmp.path());
    let out_dir = tmp.path().join("out");
    let out = Command::new(flowgen_bin())
        .args(["generate", "--n", "2", "--out", out_dir.to_str().unwrap()])
        .env("FLOWGEN_MODEL", &model)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let manifest = read_manifest(&out_dir);
    // init-random writes defaults: heun, 4 steps, guidance 1.5.
    assert_eq!(manifest["images"][0]["sampler"], "heun");
    assert_eq!(manifest["images"][0]["steps"], 4);
    assert_eq!(manifest["images"][0]["nfe"], 8);
    assert_eq!(manifest["images"][1]["guidance"], 1.5);
    assert_eq!(manifest["images"][1]["guidance_interval"], serde_json::json!([0.0, 1.0]));

    // The guidance interval can be overridden per run and is recorded.
    let out = flowgen(&[
        "generate",
        "--model",
        &model,
        "--n",
        "1",
        "--guidance-interval",
        "0.2,1",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let manifest = read_manifest(&out_dir);
    assert_eq!(manifest["images"][0]["guidance_interval"], serde_json::json!([0.2, 1.0]));
    let (_, text) = Image::from_png(&std::fs::read(out_dir.join("000.png")).unwrap()).unwrap();
    assert!(text.contains(&("guidance_interval".to_string(), "0.2,1".to_string())), "{text:?}");
}

#[test]
fn adaptive_sampler_and_explicit_schedule_run() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(tmp.path());
    let schedule = tmp.path().join("boss.json");
    std::fs::write(&schedule, "[0, 0.1, 0.3, 0.6, 1]").unwrap();
    let out_dir = tmp.path().join("a");
    let out = flowgen(&[
        "generate",
        "--model",
        &model,
        "--n",
        "2",
        "--schedule",
        schedule.to_str().unwrap(),
        "--sampler",
        "euler",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let manifest = read_manifest(&out_dir);
    assert_eq!(manifest["images"][0]["nfe"], 4);
    let out_dir = tmp.path().join("b");
    let out = flowgen(&[
        "generate",
        "--model",
        &model,
        "--n",
        "2",
        "--sampler",
        "dopri5",
        "--rtol",
        "1e-3",
        "--atol",
        "1e-3",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn bad_input_fails_with_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(tmp.path());
    let out_dir = tmp.path().join("out");
    let out_dir = out_dir.to_str().unwrap();
    assert_clean_failure(
        &flowgen(&["generate", "--model", &model, "--sampler", "ddim", "--out", out_dir]),
        "unknown sampler \"ddim\"",
    );
    assert_clean_failure(&flowgen(&["generate", "--model", &model, "--steps", "0", "--out", out_dir]), "steps");
    assert_clean_failure(&flowgen(&["generate", "--model", &model, "--label", "12", "--out", out_dir]), "out of range");
    assert_clean_failure(
        &flowgen(&["generate", "--model", &model, "--label", "eleven", "--out", out_dir]),
        "\"eleven\"",
    );
    assert_clean_failure(
        &flowgen(&["generate", "--model", &model, "--schedule", "0,0.7,0.3,1", "--out", out_dir]),
        "schedule",
    );
    assert_clean_failure(&flowgen(&["generate", "--model", &model, "--device", "tpu", "--out", out_dir]), "device");
    assert_clean_failure(
        &flowgen(&["generate", "--model", &model, "--guidance-interval", "0.8,0.2", "--out", out_dir]),
        "guidance_interval",
    );

    // A model directory without weights.
    let no_weights = tmp.path().join("no-weights");
    std::fs::create_dir_all(&no_weights).unwrap();
    std::fs::copy(Path::new(&model).join("model.toml"), no_weights.join("model.toml")).unwrap();
    assert_clean_failure(
        &flowgen(&["generate", "--model", no_weights.to_str().unwrap(), "--out", out_dir]),
        "not found",
    );

    // Weights with wrong shapes: another architecture's file under this model's name.
    let wrong = tmp.path().join("wrong");
    let out = flowgen(&["model", "init-random", "--out", wrong.to_str().unwrap()]);
    assert!(out.status.success());
    let toml =
        std::fs::read_to_string(wrong.join("model.toml")).unwrap().replace("hidden_size = 32", "hidden_size = 64");
    std::fs::write(wrong.join("model.toml"), toml).unwrap();
    let out = flowgen(&["generate", "--model", wrong.to_str().unwrap(), "--out", out_dir]);
    assert_clean_failure(&out, "mis-shaped");
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("x_embedder.proj.weight: model expects [64, 4, 1, 1], file has [32, 4, 1, 1]"));

    assert_clean_failure(&flowgen(&["generate", "--model", tmp.path().join("nope").to_str().unwrap()]), "model.toml");
}

fn read_manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

/// Write a tiny MNIST-format data directory (IDX, gzip) of synthetic bar "digits".
fn synthetic_mnist(dir: &Path, n: usize) {
    use std::io::Write;
    std::fs::create_dir_all(dir).unwrap();
    let write = |name: &str, magic: u32, dims: &[u32], body: &[u8]| {
        let mut bytes = magic.to_be_bytes().to_vec();
        for d in dims {
            bytes.extend(d.to_be_bytes());
        }
        bytes.extend(body);
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&bytes).unwrap();
        std::fs::write(dir.join(name), enc.finish().unwrap()).unwrap();
    };
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    let mut images = vec![0u8; n * 784];
    for (i, &l) in labels.iter().enumerate() {
        for col in 4..24 {
            images[i * 784 + (2 + 2 * l as usize) * 28 + col] = 255;
        }
    }
    for split in ["train", "val"] {
        write(&format!("{split}-images-idx3-ubyte.gz"), 2051, &[n as u32, 28, 28], &images);
        write(&format!("{split}-labels-idx1-ubyte.gz"), 2049, &[n as u32], &labels);
    }
}

#[test]
fn train_autoencoder_velocity_classifier_then_generate_and_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("mnist");
    synthetic_mnist(&data, 40);
    let data = data.to_str().unwrap();
    let ae = tmp.path().join("ae");
    let run = |args: &[&str]| {
        let out = flowgen(args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let stdout = run(&[
        "train",
        "autoencoder",
        "--data",
        data,
        "--out",
        ae.to_str().unwrap(),
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--channels",
        "8,8,8",
        "--groups",
        "4",
    ]);
    assert!(stdout.contains("val PSNR"), "{stdout}");
    let vel = tmp.path().join("vel");
    let stdout = run(&[
        "train",
        "velocity",
        "--data",
        data,
        "--autoencoder",
        ae.to_str().unwrap(),
        "--out",
        vel.to_str().unwrap(),
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--hidden",
        "16",
        "--depth",
        "1",
        "--heads",
        "2",
        "--objective",
        "wcfm",
    ]);
    assert!(stdout.contains("velocity (wcfm)"), "{stdout}");
    assert!(vel.join("kappa_curve.csv").exists());
    let clf = tmp.path().join("clf");
    run(&["train", "classifier", "--data", data, "--out", clf.to_str().unwrap(), "--steps", "3", "--batch-size", "8"]);
    let model = vel.join("model");
    let gen = tmp.path().join("gen");
    run(&["generate", "--model", model.to_str().unwrap(), "--n", "3", "--out", gen.to_str().unwrap()]);
    assert!(gen.join("002.png").exists());
    let eval_args = ["eval", "--model", model.to_str().unwrap(), "--classifier", clf.to_str().unwrap(), "--data", data];
    let eval = |extra: &[&str]| run(&[&eval_args[..], extra].concat());
    let stdout = eval(&["--n", "20", "--sampler", "euler", "--steps", "2", "--straightness"]);
    let result: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for key in [
        "fd",
        "fd_floor",
        "fd_ratio",
        "accuracy",
        "rmse_vs_reference",
        "nfe_per_image",
        "seconds_per_image",
        "straightness",
        "fd_autoencoder_floor",
        "fd_autoencoder_sampled_floor",
    ] {
        assert!(result[key].as_f64().is_some_and(f64::is_finite), "{key}: {stdout}");
    }
    assert_eq!(result["nfe_per_image"], 2.0);
    // Lists of samplers and step counts on the same noise, without the reference solve.
    let stdout = eval(&["--n", "10", "--sampler", "euler,dopri5", "--steps", "1,3", "--no-reference"]);
    let results: Vec<serde_json::Value> =
        serde_json::Deserializer::from_str(&stdout).into_iter().collect::<Result<_, _>>().unwrap();
    let runs: Vec<(&str, u64)> =
        results.iter().map(|r| (r["sampler"].as_str().unwrap(), r["steps"].as_u64().unwrap())).collect();
    // Samplers are echoed in canonical form, parameters and all.
    assert_eq!(runs, [("euler", 1), ("euler", 3), ("dopri5:rtol=1e-5,atol=1e-5,max_nfe=5000", 0)], "{stdout}");
    assert!(results.iter().all(|r| r.get("rmse_vs_reference").is_none()), "{stdout}");
    assert_eq!(results[1]["nfe_per_image"], 3.0);
    // The sampler benchmark: every family at each budget it can spend exactly, then the reference.
    let bench = tmp.path().join("bench");
    let stdout = run(&[
        "bench",
        "samplers",
        "--model",
        model.to_str().unwrap(),
        "--classifier",
        clf.to_str().unwrap(),
        "--data",
        data,
        "--n",
        "16",
        "--batch",
        "8",
        "--alone",
        "1",
        "--nfe",
        "1,2,4",
        "--samplers",
        "euler,heun,rk4,dopri5",
        "--schedules",
        "uniform,shift:2",
        "--out",
        bench.to_str().unwrap(),
    ]);
    assert!(stdout.contains("FD floor") && stdout.contains("GEMM"), "{stdout}");
    let csv = std::fs::read_to_string(bench.join("samplers.csv")).unwrap();
    let rows: Vec<(String, String, String)> = csv
        .lines()
        .skip(1)
        .map(|l| {
            let cells: Vec<&str> = l.split(',').collect();
            let name = cells[0].trim_start_matches('"').split(':').next().unwrap().to_string();
            if name == "dopri5" {
                (name, "uniform".into(), "0".into())
            } else {
                (name, cells[1].to_string(), cells[4].to_string())
            }
        })
        .collect();
    let expected: Vec<(String, String, String)> = [
        ("euler", "uniform", "1"),
        ("euler", "uniform", "2"),
        ("euler", "uniform", "4"),
        ("euler", "shift:2", "1"),
        ("euler", "shift:2", "2"),
        ("euler", "shift:2", "4"),
        ("heun", "uniform", "2"),
        ("heun", "uniform", "4"),
        ("heun", "shift:2", "2"),
        ("heun", "shift:2", "4"),
        ("rk4", "uniform", "4"),
        ("rk4", "shift:2", "4"),
        ("dopri5", "uniform", "0"),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    assert_eq!(rows, expected, "{csv}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bench.join("samplers.json")).unwrap()).unwrap();
    assert!(report["setup"]["gemm_gflops"].as_f64().unwrap() > 0.0);
    for row in report["rows"].as_array().unwrap() {
        for key in ["fd_ratio", "gflops_per_image", "ms_per_image_alone", "ms_per_image_batched"] {
            assert!(row[key].as_f64().is_some_and(|v| v.is_finite() && v > 0.0), "{key}: {row}");
        }
    }
    assert!(report["rows"].as_array().unwrap().iter().any(|r| r["pareto"] == true));
    for plot in
        ["samplers_fd_vs_nfe_uniform.png", "samplers_fd_vs_nfe_shift-2.png", "samplers_fd_vs_ms.png", "samplers.md"]
    {
        assert!(bench.join(plot).exists(), "{plot}");
    }
}

#[test]
fn training_with_missing_or_corrupt_data_fails_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let missing = flowgen(&[
        "train",
        "autoencoder",
        "--data",
        tmp.path().join("nope").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_clean_failure(&missing, "train-images-idx3-ubyte");
    let data = tmp.path().join("mnist");
    synthetic_mnist(&data, 10);
    std::fs::write(data.join("train-images-idx3-ubyte.gz"), [0x1f, 0x8b, 0, 1, 2, 3]).unwrap();
    let corrupt = flowgen(&["train", "classifier", "--data", data.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert_clean_failure(&corrupt, "corrupt gzip");
}

#[test]
fn the_shipped_default_model_loads_and_generates_digits() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let model = repo.join("models/default");
    let check = flowgen(&["model", "check", "--model", model.to_str().unwrap()]);
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    // No --model: the default is found next to the binary (target/<profile>/flowgen -> models/default).
    let out = Command::new(flowgen_bin())
        .args(["generate", "--label", "seven", "--n", "2", "--steps", "2", "--out", out_dir.to_str().unwrap()])
        .env_remove("FLOWGEN_MODEL")
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (image, text) = Image::from_png(&std::fs::read(out_dir.join("001.png")).unwrap()).unwrap();
    assert_eq!((image.width, image.height, image.channels), (28, 28, 1));
    assert!(text.contains(&("model".to_string(), "mnist-latent-icfm".to_string())), "{text:?}");
    assert!(text.contains(&("label".to_string(), "7".to_string())), "{text:?}");
    // A digit, not noise: mostly dark background with some bright strokes.
    let dark = image.pixels.iter().filter(|&&p| p < 64).count();
    let bright = image.pixels.iter().filter(|&&p| p > 192).count();
    assert!(dark > 784 / 2 && bright > 20, "dark {dark}, bright {bright}");
}

#[test]
fn every_shipped_velocity_model_loads_and_generates() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(repo.join("models")).unwrap() {
        let dir = entry.unwrap().path();
        if !dir.join("model.toml").exists() {
            continue; // the autoencoder and the classifier are not velocity models
        }
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let check = flowgen(&["model", "check", "--model", dir.to_str().unwrap()]);
        assert!(check.status.success(), "{name}: {}", String::from_utf8_lossy(&check.stderr));
        let out_dir = tmp.path().join(&name);
        let out = flowgen(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--label",
            "3",
            "--n",
            "1",
            "--sampler",
            "euler",
            "--steps",
            "2",
            // Named: a model's default schedule may fix its own steps (models/straightened: boss-4).
            "--schedule",
            "uniform",
            "--out",
            out_dir.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(out_dir.join("000.png").exists(), "{name}");
        checked.push(name);
    }
    assert!(checked.iter().any(|n| n == "default") && checked.iter().any(|n| n == "blockwise"), "{checked:?}");
}

/// The shipped classifier's reading of generated PNGs: the share whose digit matches its label.
fn classifier_agreement(dir: &Path, labels: &[u32]) -> f64 {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let device = candle_core::Device::Cpu;
    let classifier =
        flowgen_train::classifier::Classifier::load(&repo.join("models/mnist-classifier"), &device).unwrap();
    let mut pixels = Vec::new();
    for i in 0..labels.len() {
        let (image, _) = Image::from_png(&std::fs::read(dir.join(format!("{i:03}.png"))).unwrap()).unwrap();
        assert_eq!((image.width, image.height, image.channels), (28, 28, 1));
        pixels.extend(image.pixels.iter().map(|&p| p as f32 / 127.5 - 1.0));
    }
    let x = candle_core::Tensor::from_vec(pixels, (labels.len(), 1, 28, 28), &device).unwrap();
    let read: Vec<u32> = classifier.logits(&x).unwrap().argmax(1).unwrap().to_vec1().unwrap();
    read.iter().zip(labels).filter(|(a, b)| a == b).count() as f64 / labels.len() as f64
}

#[test]
fn the_shipped_blockwise_model_draws_every_digit_with_euler_and_fra() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let model = repo.join("models/blockwise");
    let tmp = tempfile::tempdir().unwrap();
    let labels: Vec<u32> = (0..30).map(|i| i % 10).collect();
    let mut gflops = Vec::new();
    for sampler in ["euler", "fra"] {
        let out_dir = tmp.path().join(sampler);
        let args =
            ["generate", "--model", model.to_str().unwrap(), "--label", "0-9", "--n", "30", "--sampler", sampler];
        let out = flowgen(&[&args[..], &["--steps", "8", "--out", out_dir.to_str().unwrap()]].concat());
        assert!(out.status.success(), "{sampler}: {}", String::from_utf8_lossy(&out.stderr));
        let agreement = classifier_agreement(&out_dir, &labels);
        assert!(agreement >= 0.8, "{sampler}: the classifier reads only {agreement} of the digits as their label");
        let manifest = read_manifest(&out_dir);
        let cost = manifest["images"][0]["gflops"].as_f64().unwrap_or_else(|| panic!("{manifest}"));
        gflops.push(cost);
    }
    // FRA runs the trunk once per segment and the cheaper FRN at the other steps.
    assert!(gflops[1] < gflops[0], "fra {} vs euler {} GFLOPs per image", gflops[1], gflops[0]);
}

#[test]
fn stored_schedules_presets_formats_and_canonical_samplers_through_the_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(tmp.path());
    let model_dir = Path::new(&model);
    std::fs::create_dir_all(model_dir.join("schedules")).unwrap();
    std::fs::write(model_dir.join("schedules/boss-3.json"), "[0, 0.2, 0.6, 1]").unwrap();
    let toml = std::fs::read_to_string(model_dir.join("model.toml")).unwrap();
    std::fs::write(
        model_dir.join("model.toml"),
        toml + "\n[presets.quick]\nsampler = \"euler\"\nschedule = \"boss-3\"\n",
    )
    .unwrap();
    let run = |dir: &str, extra: &[&str]| {
        let out_dir = tmp.path().join(dir);
        let mut args = vec!["generate", "--model", &model, "--n", "2", "--out", out_dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = flowgen(&args);
        assert!(out.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
        (out_dir.clone(), read_manifest(&out_dir))
    };
    // A preset with a stored schedule: 3 Euler steps on the stored grid.
    let (_, manifest) = run("preset", &["--preset", "quick"]);
    let first = &manifest["images"][0];
    assert_eq!(
        (first["sampler"].as_str(), first["schedule"].as_str(), first["nfe"].as_u64()),
        (Some("euler"), Some("boss-3"), Some(3))
    );
    assert_eq!(first["evaluations"], serde_json::json!({"velocity": 3}));
    // A parameterised plan comes back in canonical form, in the manifest and in the JPEG's XMP.
    let (dir, manifest) =
        run("jpeg", &["--sampler", "DOPRI5:atol=1e-3,rtol=1e-3", "--format", "jpeg", "--quality", "80"]);
    let first = &manifest["images"][0];
    assert_eq!(first["sampler"], "dopri5:rtol=1e-3,atol=1e-3,max_nfe=2000");
    assert_eq!((first["file"].as_str(), first["format"].as_str()), (Some("000.jpg"), Some("jpeg")));
    let jpeg = std::fs::read(dir.join("000.jpg")).unwrap();
    assert!(jpeg.starts_with(b"\xFF\xD8\xFF\xE1"));
    assert!(String::from_utf8_lossy(&jpeg).contains("flowgen:sampler=\"dopri5:rtol=1e-3,atol=1e-3,max_nfe=2000\""));
    let (dir, _) = run("webp", &["--format", "webp"]);
    let webp = std::fs::read(dir.join("001.webp")).unwrap();
    assert!(webp.starts_with(b"RIFF") && &webp[8..12] == b"WEBP");
    assert!(String::from_utf8_lossy(&webp).contains("flowgen:seed=\"1\""));
    // The model's own default schedule is a stored one now: a typo there stops the load.
    let toml = std::fs::read_to_string(model_dir.join("model.toml")).unwrap();
    std::fs::write(model_dir.join("model.toml"), toml.replace("schedule = \"uniform\"", "schedule = \"boss-4\""))
        .unwrap();
    let out = flowgen(&["generate", "--model", &model, "--out", tmp.path().join("x").to_str().unwrap()]);
    assert_clean_failure(&out, "boss-4");
}

#[test]
fn boss_schedules_are_searched_stored_and_used_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let model = random_model(tmp.path());
    let out = flowgen(&["schedule", "boss", "--model", &model, "--nfe", "2,3", "--kmax", "12", "--n", "6"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("| boss-2 |") && stdout.contains("| boss-3 |"), "{stdout}");
    let schedules = Path::new(&model).join("schedules");
    assert!(schedules.join("boss.png").is_file());
    let points: Vec<f64> =
        serde_json::from_str(&std::fs::read_to_string(schedules.join("boss-3.json")).unwrap()).unwrap();
    assert_eq!(points.len(), 4);
    assert_eq!((points[0], points[3]), (0.0, 1.0));
    assert!(points.windows(2).all(|w| w[0] < w[1]), "{points:?}");
    // Every anchor is a multiple of 1/12.
    assert!(points.iter().all(|p| ((p * 12.0).round() - p * 12.0).abs() < 1e-9), "{points:?}");
    let out_dir = tmp.path().join("out");
    let out = flowgen(&[
        "generate",
        "--model",
        &model,
        "--n",
        "2",
        "--sampler",
        "euler",
        "--schedule",
        "boss-3",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let manifest = read_manifest(&out_dir);
    assert_eq!(
        (manifest["images"][0]["schedule"].as_str(), manifest["images"][0]["nfe"].as_u64()),
        (Some("boss-3"), Some(3))
    );
    let bad = flowgen(&["schedule", "boss", "--model", &model, "--nfe", "13", "--kmax", "12", "--n", "2"]);
    assert_clean_failure(&bad, "--kmax");
}

#[test]
fn bench_frontier_runs_one_model_per_process_and_merges_the_runs_into_one_report() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let classifier = repo.join("models/mnist-classifier");
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("mnist");
    synthetic_mnist(&data, 20);
    let single = random_model(tmp.path());
    let blockwise = tmp.path().join("blockwise");
    let made = flowgen(&["model", "init-random", "--out", blockwise.to_str().unwrap(), "--seed", "3", "--blockwise"]);
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let frontier = |model: &str, samplers: &str, n: &str, seed: &str, out: &str| {
        let out_dir = tmp.path().join(out);
        let run = flowgen(&[
            "bench",
            "frontier",
            "--models",
            model,
            "--samplers",
            samplers,
            "--steps",
            "2,8",
            "--n",
            n,
            "--batch",
            "10",
            "--seed",
            seed,
            "--classifier",
            classifier.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
        ]);
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        out_dir.join("frontier.json")
    };
    // The single network cannot run fra: it is skipped with the reason, not an error.
    let a = frontier(&single, "euler,fra", "10", "0", "a");
    let b = frontier(blockwise.to_str().unwrap(), "euler,fra", "10", "0", "b");
    let joined = tmp.path().join("joined");
    let merged = flowgen(&[
        "bench",
        "frontier",
        "--merge",
        &format!("{},{}", a.display(), b.display()),
        "--out",
        joined.to_str().unwrap(),
    ]);
    assert!(merged.status.success(), "{}", String::from_utf8_lossy(&merged.stderr));
    let points: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(joined.join("frontier.json")).unwrap()).unwrap();
    let runs: Vec<(String, String, u64)> = points
        .iter()
        .map(|p| {
            (p["model"].as_str().unwrap().into(), p["sampler"].as_str().unwrap().into(), p["steps"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(runs.len(), 6, "{runs:?}");
    assert_eq!(runs.iter().filter(|r| r.1 == "fra").count(), 2, "{runs:?}");
    let gflops = |sampler: &str, steps: u64| {
        let p =
            points.iter().find(|p| p["sampler"] == sampler && p["steps"] == steps && p["model"] != runs[0].0).unwrap();
        p["gflops_per_image"].as_f64().unwrap()
    };
    // At 2 steps every step opens a segment (all full); at 8 FRA reuses the trunk through the FRN.
    assert_eq!(gflops("fra", 2), gflops("euler", 2), "{points:?}");
    assert!(gflops("fra", 8) < gflops("euler", 8), "{points:?}");
    let table = std::fs::read_to_string(joined.join("frontier.md")).unwrap();
    assert_eq!(table.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| model")).count(), 6, "{table}");
    assert!(joined.join("frontier.png").exists() && joined.join("frontier.csv").exists());
    // Runs on other images (another count, or other seeds) do not share a frontier.
    for (n, seed, out, why) in [("12", "0", "c", "n 12"), ("10", "5", "d", "seed 5")] {
        let other = frontier(&single, "euler", n, seed, out);
        let refused = flowgen(&[
            "bench",
            "frontier",
            "--merge",
            &format!("{},{}", a.display(), other.display()),
            "--out",
            joined.to_str().unwrap(),
        ]);
        assert_clean_failure(&refused, "--merge");
        assert_clean_failure(&refused, why);
    }
}
