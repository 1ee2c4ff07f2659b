//! Model directories: network kinds, stored schedules and presets, defaults checked at load,
//! and the one function that fills solve settings from them.

use candle_core::Device;
use flowgen_engine::random_model::{tiny_latent_config, write_random_model};
use flowgen_engine::samplers::{Dopri5Options, Unobserved};
use flowgen_engine::{
    Error, ImageInputs, ModelConfig, Pipeline, Sampler, ScheduleAccess, ScheduleSpec, SettingsRequest,
};

fn model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_random_model(dir.path(), &tiny_latent_config("test"), 42).unwrap();
    dir
}

fn edit_toml(dir: &std::path::Path, edit: impl FnOnce(String) -> String) {
    let path = dir.join("model.toml");
    std::fs::write(&path, edit(std::fs::read_to_string(&path).unwrap())).unwrap();
}

fn load_error(dir: &std::path::Path) -> String {
    ModelConfig::load(dir).unwrap_err().to_string()
}

#[test]
fn network_kind_is_tagged_and_defaults_to_sit() {
    let dir = model_dir();
    let text = std::fs::read_to_string(dir.path().join("model.toml")).unwrap();
    assert!(text.contains("kind = \"sit\""), "{text}");
    // A model.toml written before kinds existed has no `kind` and still loads as SiT.
    edit_toml(dir.path(), |t| t.replace("kind = \"sit\"\n", ""));
    let cfg = ModelConfig::load(dir.path()).unwrap();
    assert_eq!(cfg.network.arch.kind(), "sit");
    assert_eq!((cfg.num_classes(), cfg.state_shape(), cfg.image_shape()), (10, (4, 7, 7), (1, 28, 28)));
    Pipeline::load(dir.path(), &Device::Cpu).unwrap();

    edit_toml(dir.path(), |t| t.replace("[network]\n", "[network]\nkind = \"unet\"\n"));
    let msg = load_error(dir.path());
    assert!(msg.contains("unknown network kind \"unet\"") && msg.contains("known kinds: sit"), "{msg}");
}

#[test]
fn a_model_directory_may_hold_more_networks() {
    let dir = model_dir();
    std::fs::copy(dir.path().join("velocity.safetensors"), dir.path().join("refiner.safetensors")).unwrap();
    let main = std::fs::read_to_string(dir.path().join("model.toml")).unwrap();
    let network = main.split("[network]\n").nth(1).unwrap().split("\n[").next().unwrap();
    let extra = format!("\n[networks.refiner]\n{}\n", network.replace("velocity.safetensors", "refiner.safetensors"));
    edit_toml(dir.path(), |t| t + &extra);
    let pipeline = Pipeline::load(dir.path(), &Device::Cpu).unwrap();
    assert!(pipeline.network("refiner").is_some());
    assert!(pipeline.network("other").is_none());

    std::fs::remove_file(dir.path().join("refiner.safetensors")).unwrap();
    let msg = Pipeline::load(dir.path(), &Device::Cpu).err().unwrap().to_string();
    assert!(msg.contains("refiner.safetensors") && msg.contains("not found"), "{msg}");
}

#[test]
fn null_label_is_declared_or_inferred_and_guided_channels_are_checked() {
    let dir = model_dir();
    assert_eq!(ModelConfig::load(dir.path()).unwrap().null_label(), Some(10));
    // An inference-only config: no dropout value, the null label declared instead.
    edit_toml(dir.path(), |t| {
        t.replace("class_dropout_prob = 0.1", "class_dropout_prob = 0.0")
            .replace("[guidance]\n", "[guidance]\nnull_label = 10\n")
    });
    assert_eq!(ModelConfig::load(dir.path()).unwrap().null_label(), Some(10));
    let pipeline = Pipeline::load(dir.path(), &Device::Cpu).unwrap();
    let settings = pipeline.config().solve_settings(&SettingsRequest::default(), ScheduleAccess::Named).unwrap();
    assert_eq!(settings.guidance, 1.5);
    pipeline.generate(&settings, &ImageInputs::cycle(&[3], 2, 0), &mut Unobserved).unwrap();

    edit_toml(dir.path(), |t| t.replace("null_label = 10", "null_label = 4"));
    assert!(load_error(dir.path()).contains("null_label"));
    edit_toml(dir.path(), |t| t.replace("null_label = 4\n", "channels = [0, 1, 1]\n"));
    let msg = load_error(dir.path());
    assert!(msg.contains("[guidance] channels: 1 is listed twice"), "{msg}");
}

#[test]
fn stored_schedules_and_presets_resolve_relative_to_the_model() {
    let dir = model_dir();
    std::fs::create_dir(dir.path().join("schedules")).unwrap();
    std::fs::write(dir.path().join("schedules/boss-3.json"), "[0, 0.2, 0.6, 1]").unwrap();
    edit_toml(dir.path(), |t| {
        t + "\n[presets.fast]\nsampler = \"euler\"\nschedule = \"boss-3\"\n\n[presets.exact]\nsampler = \"dopri5:rtol=1e-3\"\n"
    });
    let cfg = ModelConfig::load(dir.path()).unwrap();
    let stored = ScheduleSpec::Named { name: "boss-3".into(), points: vec![0.0, 0.2, 0.6, 1.0] };
    // A request names the schedule; its steps come from the list.
    let named = SettingsRequest { schedule: Some("boss-3".into()), ..Default::default() };
    let settings = cfg.solve_settings(&named, ScheduleAccess::Named).unwrap();
    assert_eq!(
        (settings.sampler.clone(), settings.steps, settings.schedule.clone()),
        (Sampler::Heun, 3, stored.clone())
    );
    // A preset sets sampler and schedule; request fields still win over it.
    let fast = SettingsRequest { preset: Some("fast".into()), ..Default::default() };
    let settings = cfg.solve_settings(&fast, ScheduleAccess::Named).unwrap();
    assert_eq!((settings.sampler, settings.steps, settings.schedule), (Sampler::Euler, 3, stored));
    let fast_rk4 = SettingsRequest { sampler: Some("rk4".into()), ..fast.clone() };
    assert_eq!(cfg.solve_settings(&fast_rk4, ScheduleAccess::Named).unwrap().sampler, Sampler::Rk4);
    let exact = SettingsRequest { preset: Some("exact".into()), ..Default::default() };
    let settings = cfg.solve_settings(&exact, ScheduleAccess::Named).unwrap();
    assert_eq!(settings.sampler, Sampler::Dopri5(Dopri5Options { rtol: 1e-3, ..Default::default() }));
    let missing = SettingsRequest { preset: Some("slow".into()), ..Default::default() };
    let msg = cfg.solve_settings(&missing, ScheduleAccess::Named).unwrap_err().to_string();
    assert!(msg.contains("unknown preset \"slow\"") && msg.contains("exact, fast"), "{msg}");

    // A path is never a schedule for untrusted callers, however it is spelled.
    let file = dir.path().join("schedules/boss-3.json");
    let by_path = SettingsRequest { schedule: Some(file.display().to_string()), ..Default::default() };
    let err = cfg.solve_settings(&by_path, ScheduleAccess::Named).unwrap_err();
    assert!(matches!(&err, Error::Invalid { field: "schedule", .. }), "{err}");
    assert_eq!(cfg.solve_settings(&by_path, ScheduleAccess::NamedAndFiles).unwrap().steps, 3);
}

#[test]
fn defaults_are_checked_when_the_model_loads() {
    let dir = model_dir();
    edit_toml(dir.path(), |t| t.replace("sampler = \"heun\"", "sampler = \"huen\""));
    let msg = load_error(dir.path());
    assert!(msg.contains("[defaults]") && msg.contains("huen"), "{msg}");

    let dir = model_dir();
    edit_toml(dir.path(), |t| t.replace("schedule = \"uniform\"", "schedule = \"boss-6\""));
    let msg = load_error(dir.path());
    assert!(msg.contains("[defaults]") && msg.contains("boss-6") && msg.contains("stores no schedules"), "{msg}");

    let dir = model_dir();
    edit_toml(dir.path(), |t| t.replace("[defaults]\n", "[defaults]\npreset = \"turbo\"\n"));
    assert!(load_error(dir.path()).contains("preset \"turbo\""));

    let dir = model_dir();
    edit_toml(dir.path(), |t| t + "\n[presets.bad]\nsampler = \"dopri5:rtol=0\"\n");
    assert!(load_error(dir.path()).contains("[presets.bad]"));
}

#[test]
fn an_adaptive_sampler_takes_no_schedule() {
    let dir = model_dir();
    std::fs::create_dir(dir.path().join("schedules")).unwrap();
    std::fs::write(dir.path().join("schedules/boss-3.txt"), "0 0.2 0.6 1").unwrap();
    // The model's default schedule is a stored list; choosing dopri5 must not trip over it.
    edit_toml(dir.path(), |t| {
        t.replace("schedule = \"uniform\"", "schedule = \"boss-3\"").replace("steps = 4", "steps = 3")
    });
    let pipeline = Pipeline::load(dir.path(), &Device::Cpu).unwrap();
    let cfg = pipeline.config();
    let dopri = SettingsRequest { sampler: Some("dopri5:rtol=1e-3,atol=1e-3".into()), ..Default::default() };
    let settings = cfg.solve_settings(&dopri, ScheduleAccess::Named).unwrap();
    assert_eq!((settings.steps, settings.schedule.clone()), (0, ScheduleSpec::Uniform));
    let out = pipeline.generate(&settings, &ImageInputs::cycle(&[1, 2], 2, 5), &mut Unobserved).unwrap();
    assert!(out.stats.failures.is_empty() && out.stats.nfe() > 8);
    // Asking for one explicitly is an error naming the field.
    let both = SettingsRequest { schedule: Some("boss-3".into()), ..dopri };
    let err = cfg.solve_settings(&both, ScheduleAccess::Named).unwrap_err();
    assert!(matches!(&err, Error::Invalid { field: "schedule", message } if message.contains("adaptive")), "{err}");
}

#[test]
fn a_flowturbo_refiner_is_checked_where_model_toml_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = flowgen_engine::random_model::with_tiny_refiner(tiny_latent_config("ft"), "flowturbo:H2P4R2");
    write_random_model(dir.path(), &cfg, 42).unwrap();
    let text = std::fs::read_to_string(dir.path().join("model.toml")).unwrap();
    assert!(text.contains("kind = \"flowturbo-refiner\"") && text.contains("in_channels_scale = 2"), "{text}");
    assert!(text.contains("[sampler_plans]\nflowturbo = \"flowturbo:H2P4R2\""), "{text}");
    let loaded = ModelConfig::load(dir.path()).unwrap();
    assert_eq!(loaded, ModelConfig { schedules: loaded.schedules.clone(), ..cfg });
    assert_eq!(loaded.resolve_sampler(" FLOWTURBO ").unwrap().canonical(), "flowturbo:H2P4R2");
    assert!(loaded.network_flops("refiner").unwrap() < loaded.network_flops("velocity").unwrap());

    let original = text.clone();
    let broken = |from: &str, to: &str| {
        std::fs::write(dir.path().join("model.toml"), original.replacen(from, to, 1)).unwrap();
        load_error(dir.path())
    };
    let msg = broken("in_channels_scale = 2", "in_channels_scale = 1");
    assert!(msg.contains("[networks.refiner]") && msg.contains("in_channels_scale = 1"), "{msg}");
    let msg = broken("flowturbo = \"flowturbo:H2P4R2\"", "flowturbo = \"flowturbo:H2Q4\"");
    assert!(msg.contains("[sampler_plans] flowturbo") && msg.contains("not H, P or R"), "{msg}");
    let msg = broken("flowturbo = \"flowturbo:H2P4R2\"", "flowturbo = \"heun\"");
    assert!(msg.contains("is a heun plan, not a flowturbo one"), "{msg}");
    let msg = broken("[networks.refiner]", "[networks.helper]");
    assert!(msg.contains("calls the network \"refiner\""), "{msg}");
    let msg = broken("kind = \"sit\"", "kind = \"flowturbo-refiner\"");
    assert!(msg.contains("belongs in [networks.refiner]"), "{msg}");
}
