//! Server configuration: built-in defaults (= config/default.toml) < config file < FLOWGEN_* env < flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::error::{Result, ServerError};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSection {
    /// Address to listen on; port 0 picks a free port.
    pub listen: String,
    /// Journal database and results live here.
    pub data_dir: PathBuf,
    /// Requests that take longer are answered 408 (the synchronous endpoint: 504 with the job id).
    pub request_timeout_s: u64,
    /// Largest accepted request body.
    pub body_limit_bytes: usize,
    /// On SIGTERM the running batch gets this long to finish; queued jobs stay journaled.
    pub shutdown_grace_s: u64,
    /// Origins allowed by CORS; empty keeps CORS closed.
    pub cors_origins: Vec<String>,
    /// Open connections served in full; past it a few more answer only the probes, then 503.
    pub max_connections: usize,
    /// A client must send a request head within this long (also the idle keep-alive limit).
    pub header_timeout_s: u64,
    /// A request body must arrive within this long (408 otherwise).
    pub body_timeout_s: u64,
    /// Host names the API answers to besides IP literals and localhost (421 otherwise), so a DNS
    /// rebinding page cannot reach it; ".example.com" allows subdomains, "*" any host.
    pub allowed_hosts: Vec<String>,
    /// all (API and engine in one process), api (accepts and serves jobs, loads no weights) or
    /// worker (runs jobs from the shared queue); api and worker need queue.url.
    pub role: Role,
}

/// Which half of the service a process runs.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    All,
    Api,
    Worker,
}

impl Role {
    /// Serves the HTTP job API.
    pub fn runs_api(self) -> bool {
        matches!(self, Role::All | Role::Api)
    }

    /// Loads models and runs batches.
    pub fn runs_engine(self) -> bool {
        matches!(self, Role::All | Role::Worker)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::All => "all",
            Role::Api => "api",
            Role::Worker => "worker",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        match text {
            "all" => Ok(Role::All),
            "api" => Ok(Role::Api),
            "worker" => Ok(Role::Worker),
            other => Err(format!("{other:?} is not one of all, api, worker")),
        }
    }
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            listen: "127.0.0.1:8080".into(),
            data_dir: PathBuf::from("data"),
            request_timeout_s: 300,
            body_limit_bytes: 64 * 1024,
            shutdown_grace_s: 30,
            cors_origins: Vec::new(),
            max_connections: 512,
            header_timeout_s: 10,
            body_timeout_s: 30,
            allowed_hosts: Vec::new(),
            role: Role::All,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsSection {
    /// Model directories; the first is the default model.
    pub paths: Vec<PathBuf>,
    /// cpu, cuda, cuda:N or auto.
    pub device: String,
}

impl Default for ModelsSection {
    fn default() -> Self {
        ModelsSection { paths: vec![PathBuf::from("models/default")], device: "cpu".into() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QueueSection {
    /// Queued jobs accepted before new ones get 429.
    pub capacity: usize,
    /// Most images in one engine batch.
    pub max_batch: usize,
    /// How long the oldest queued job waits for compatible jobs to fill a batch.
    pub max_wait_ms: u64,
    /// Finished jobs and their images are deleted after this long.
    pub result_ttl_s: u64,
    /// Starts of one job before it is failed for good: a job running whenever the process died
    /// (out of memory, a device fault) is not retried past this (a poison job).
    pub max_attempts: u32,
    /// Jobs one API key may have queued at once (429 past it), so no key fills the shared queue.
    pub max_queued_per_key: usize,
    /// Jobs one API key may keep stored, finished ones included until they expire or are deleted
    /// (429 past it), so no key fills the disk.
    pub max_stored_per_key: usize,
    /// redis://HOST:PORT[/DB] puts jobs, results and progress in Redis (Streams with a consumer
    /// group) so API and worker processes can run apart; empty keeps the embedded SQLite journal.
    pub url: String,
    /// A job held by a worker that sent no heartbeat for this long is taken over by another.
    pub visibility_timeout_s: u64,
    /// Prefix of every Redis key, so several deployments can share one Redis.
    pub redis_prefix: String,
}

impl Default for QueueSection {
    fn default() -> Self {
        QueueSection {
            capacity: 256,
            max_batch: 32,
            max_wait_ms: 20,
            result_ttl_s: 86_400,
            max_attempts: 3,
            max_queued_per_key: 64,
            max_stored_per_key: 10_000,
            url: String::new(),
            visibility_timeout_s: 30,
            redis_prefix: "flowgen".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Most images in one job.
    pub max_n: usize,
    /// Most sampler steps.
    pub max_steps: usize,
    /// Largest classifier-free guidance scale.
    pub max_guidance: f64,
    /// Most velocity evaluations an adaptive sampler (dopri5) may spend per image.
    pub max_nfe: usize,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection { max_n: 16, max_steps: 256, max_guidance: 20.0, max_nfe: 1000 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// Bearer keys accepted on /v1; empty leaves the API open.
    pub api_keys: Vec<String>,
    /// Job submissions per minute per key (0 = unlimited).
    pub rate_limit_per_minute: u32,
    /// Submissions a key may make at once before the rate applies.
    pub rate_limit_burst: u32,
    /// Keys (from api_keys) that may submit `priority: high`; others get 403 for it.
    pub high_priority_keys: Vec<String>,
}

impl Default for AuthSection {
    fn default() -> Self {
        AuthSection {
            api_keys: Vec::new(),
            rate_limit_per_minute: 0,
            rate_limit_burst: 10,
            high_priority_keys: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub server: ServerSection,
    pub models: ModelsSection,
    pub queue: QueueSection,
    pub limits: LimitsSection,
    pub auth: AuthSection,
}

/// Flag values that override every other layer.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub models: Vec<PathBuf>,
    pub device: Option<String>,
    pub role: Option<Role>,
    /// queue.url
    pub queue: Option<String>,
}

impl ServerConfig {
    /// Layer defaults, an optional TOML file, `FLOWGEN_<SECTION>__<KEY>` variables and flags.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(ServerConfig::default()));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ServerError::Config(format!("config file {} does not exist", path.display())));
            }
            figment = figment.merge(Toml::file(path));
        }
        // Only double-underscore names are config keys; FLOWGEN_MODEL and friends belong to the CLI.
        figment = figment.merge(Env::prefixed("FLOWGEN_").filter(|k| k.as_str().contains("__")).split("__"));
        if let Some(listen) = &overrides.listen {
            figment = figment.merge(Serialized::default("server.listen", listen));
        }
        if let Some(dir) = &overrides.data_dir {
            figment = figment.merge(Serialized::default("server.data_dir", dir));
        }
        if !overrides.models.is_empty() {
            figment = figment.merge(Serialized::default("models.paths", &overrides.models));
        }
        if let Some(device) = &overrides.device {
            figment = figment.merge(Serialized::default("models.device", device));
        }
        if let Some(role) = overrides.role {
            figment = figment.merge(Serialized::default("server.role", role));
        }
        if let Some(url) = &overrides.queue {
            figment = figment.merge(Serialized::default("queue.url", url));
        }
        let config: ServerConfig = figment.extract().map_err(|e| ServerError::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Range checks that name the offending key.
    pub fn validate(&self) -> Result<()> {
        fn bad(key: &str, message: String) -> Result<()> {
            Err(ServerError::Config(format!("{key}: {message}")))
        }
        if self.listen_addr().is_err() {
            return bad("server.listen", format!("{:?} is not an address like 127.0.0.1:8080", self.server.listen));
        }
        if self.server.body_limit_bytes < 1024 {
            return bad(
                "server.body_limit_bytes",
                format!("must be at least 1024, got {}", self.server.body_limit_bytes),
            );
        }
        if self.server.request_timeout_s == 0 {
            return bad("server.request_timeout_s", "must be at least 1".into());
        }
        if self.server.max_connections == 0 {
            return bad("server.max_connections", "must be at least 1".into());
        }
        if self.server.header_timeout_s == 0 {
            return bad("server.header_timeout_s", "must be at least 1".into());
        }
        if self.server.body_timeout_s == 0 {
            return bad("server.body_timeout_s", "must be at least 1".into());
        }
        if let Some(bad_host) = self.server.allowed_hosts.iter().find(|h| !valid_host_pattern(h)) {
            return bad(
                "server.allowed_hosts",
                format!("{bad_host:?} is not a host name like api.example.com, .example.com or *"),
            );
        }
        if self.models.paths.is_empty() {
            return bad("models.paths", "name at least one model directory".into());
        }
        let max = flowgen_engine::pipeline::MAX_BATCH;
        if self.queue.max_batch == 0 || self.queue.max_batch > max {
            return bad("queue.max_batch", format!("must be between 1 and {max}, got {}", self.queue.max_batch));
        }
        if self.queue.capacity == 0 {
            return bad("queue.capacity", "must be at least 1".into());
        }
        if self.queue.max_queued_per_key == 0 {
            return bad("queue.max_queued_per_key", "must be at least 1".into());
        }
        if self.queue.max_stored_per_key < self.queue.max_queued_per_key {
            return bad(
                "queue.max_stored_per_key",
                format!("must be at least queue.max_queued_per_key ({})", self.queue.max_queued_per_key),
            );
        }
        if self.limits.max_nfe < 6 {
            return bad("limits.max_nfe", format!("must be at least 6 (one dopri5 step), got {}", self.limits.max_nfe));
        }
        if let Some(unknown) = self.auth.high_priority_keys.iter().find(|k| !self.auth.api_keys.contains(k)) {
            let shown: String = unknown.chars().take(4).collect();
            return bad("auth.high_priority_keys", format!("key {shown}... is not one of auth.api_keys"));
        }
        if self.queue.max_attempts == 0 {
            return bad("queue.max_attempts", "must be at least 1".into());
        }
        if self.limits.max_n == 0 || self.limits.max_n > self.queue.max_batch {
            return bad(
                "limits.max_n",
                format!("must be between 1 and queue.max_batch ({}), got {}", self.queue.max_batch, self.limits.max_n),
            );
        }
        if self.limits.max_steps == 0 {
            return bad("limits.max_steps", "must be at least 1".into());
        }
        if !(self.limits.max_guidance.is_finite() && self.limits.max_guidance >= 1.0) {
            return bad(
                "limits.max_guidance",
                format!("must be a finite number >= 1, got {}", self.limits.max_guidance),
            );
        }
        if let Some(empty) = self.auth.api_keys.iter().position(|k| k.trim().len() < 8) {
            return bad("auth.api_keys", format!("key #{empty} is shorter than 8 characters"));
        }
        if self.auth.rate_limit_per_minute > 0 && self.auth.rate_limit_burst == 0 {
            return bad("auth.rate_limit_burst", "must be at least 1 when a rate limit is set".into());
        }
        let url = self.queue.url.trim();
        if !(url.is_empty() || url.starts_with("redis://")) {
            return bad("queue.url", format!("{url:?} is not a Redis URL like redis://127.0.0.1:6379/0"));
        }
        if url.is_empty() && self.server.role != Role::All {
            return bad(
                "server.role",
                format!(
                    "{} needs a shared queue: set queue.url (--queue redis://HOST:PORT)",
                    self.server.role.as_str()
                ),
            );
        }
        if self.queue.visibility_timeout_s < 2 {
            return bad(
                "queue.visibility_timeout_s",
                format!(
                    "must be at least 2 (heartbeats come every third of it), got {}",
                    self.queue.visibility_timeout_s
                ),
            );
        }
        if self.queue.redis_prefix.is_empty() || self.queue.redis_prefix.contains(char::is_whitespace) {
            return bad("queue.redis_prefix", format!("{:?} must be a non-empty word", self.queue.redis_prefix));
        }
        for origin in &self.server.cors_origins {
            if origin.parse::<axum::http::HeaderValue>().is_err() || !origin.starts_with("http") {
                return bad("server.cors_origins", format!("{origin:?} is not an origin like https://example.com"));
            }
        }
        Ok(())
    }

    /// Whether a request's `Host` header (port included or not) names this server: IP literals and
    /// localhost always do, other names only when `server.allowed_hosts` lists them.
    pub fn host_allowed(&self, host: &str) -> bool {
        let name = host_name(host);
        if name.parse::<std::net::IpAddr>().is_ok() || is_localhost(name) {
            return true;
        }
        self.server.allowed_hosts.iter().any(|allowed| {
            allowed == "*"
                || allowed.eq_ignore_ascii_case(name)
                || (allowed.starts_with('.')
                    && name.len() > allowed.len()
                    && name.get(name.len() - allowed.len()..).is_some_and(|tail| tail.eq_ignore_ascii_case(allowed)))
        })
    }

    pub fn listen_addr(&self) -> std::result::Result<SocketAddr, std::net::AddrParseError> {
        self.server.listen.parse()
    }
}

/// The host of a `Host` header value: without its port, IPv6 literals without brackets.
fn host_name(host: &str) -> &str {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("");
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

fn is_localhost(name: &str) -> bool {
    let name = name.trim_end_matches('.');
    name.eq_ignore_ascii_case("localhost")
        || name.len() > 10 && name.get(name.len() - 10..).is_some_and(|t| t.eq_ignore_ascii_case(".localhost"))
}

fn valid_host_pattern(pattern: &str) -> bool {
    let name = pattern.strip_prefix('.').unwrap_or(pattern);
    pattern == "*" || (!name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_roles_need_a_redis_queue_url() {
        let mut config = ServerConfig::default();
        assert_eq!(config.server.role, Role::All);
        for role in [Role::Api, Role::Worker] {
            config.server.role = role;
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains("server.role") && err.contains("queue.url"), "{err}");
        }
        config.queue.url = "http://127.0.0.1:6379".into();
        assert!(config.validate().unwrap_err().to_string().contains("queue.url"));
        config.queue.url = "redis://127.0.0.1:6379/0".into();
        assert!(config.validate().is_ok());
        config.queue.visibility_timeout_s = 1;
        assert!(config.validate().unwrap_err().to_string().contains("queue.visibility_timeout_s"));
        assert_eq!("worker".parse::<Role>(), Ok(Role::Worker));
        assert!("gpu".parse::<Role>().unwrap_err().contains("all, api, worker"));
    }

    #[test]
    fn hosts_are_matched_without_port_and_case() {
        let mut config = ServerConfig::default();
        for host in ["127.0.0.1:8080", "[::1]:8080", "10.0.0.7", "localhost:8080", "LOCALHOST", "a.localhost"] {
            assert!(config.host_allowed(host), "{host}");
        }
        for host in ["evil.example", "flowgen.internal:8080", "localhost.evil.example", "xlocalhost"] {
            assert!(!config.host_allowed(host), "{host}");
        }
        config.server.allowed_hosts = vec!["flowgen.internal".into(), ".example.com".into()];
        assert!(config.host_allowed("Flowgen.Internal:8080"));
        assert!(config.host_allowed("api.example.com"));
        assert!(!config.host_allowed("example.com"), "a leading dot allows subdomains only");
        assert!(!config.host_allowed("evil.example"));
        config.server.allowed_hosts = vec!["*".into()];
        assert!(config.host_allowed("anything.at.all"));
        config.server.allowed_hosts = vec!["http://x".into()];
        assert!(config.validate().is_err());
    }
}
