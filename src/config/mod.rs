//! Loading a config directory: finding the files, parsing the YAML, and compiling each
//! domain's descriptors into a `DomainTree` that requests are matched against.
//!
//! Everything is checked at load time and every problem is reported with its file, line
//! and column, so a bad config never reaches the request path.

pub mod error;
mod file;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_saphyr::{Location, Spanned};

pub use error::{ConfigError, ConfigErrors};
use file::{ConfigFile, DescriptorEntry, RateLimitBlock};

use crate::limit::{Algorithm, Limit, Unit};
use crate::matcher::{DomainTree, Level, Node, RateLimitConfig, ValuePattern};
use crate::rule::{Rule, RuleLimit, SourceLocation};

/// Choices that apply to every file of a load.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// The algorithm of rules that do not name one.
    pub default_algorithm: Algorithm,
}

/// Loads every `*.yaml` / `*.yml` file directly inside `dir`.
///
/// Names starting with a dot are skipped: that covers editor swap files and the `..data`
/// and `..2024_…` entries Kubernetes creates when it mounts a ConfigMap (the visible file
/// names are symlinks through `..data`, so each file is still read once).
pub fn load_dir(dir: &Path, options: &LoadOptions) -> Result<RateLimitConfig, ConfigErrors> {
    let files = config_files(dir).map_err(|error| ConfigErrors(vec![error]))?;
    let mut domains: Vec<DomainTree> = Vec::new();
    let mut first_seen: HashMap<String, SourceLocation> = HashMap::new();
    let mut errors = Vec::new();
    for path in files {
        let text = match fs::read(&path) {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(text) => text,
                Err(_) => {
                    errors.push(ConfigError::whole_file(
                        &path,
                        "the file is not valid UTF-8; save it as UTF-8 text",
                    ));
                    continue;
                }
            },
            Err(error) => {
                errors.push(ConfigError::whole_file(
                    &path,
                    format!("cannot read the file: {error}"),
                ));
                continue;
            }
        };
        match compile_str(&path.display().to_string(), &text, options) {
            Ok(domain) => {
                let here = SourceLocation {
                    file: domain.file.clone(),
                    line: 1,
                    column: 1,
                };
                if let Some(first) = first_seen.get(&*domain.name) {
                    errors.push(ConfigError::at(
                        &here,
                        format!(
                            "domain `{}` is already defined in {}; each domain lives in one file, so merge the two",
                            domain.name, first.file
                        ),
                    ));
                } else {
                    first_seen.insert(domain.name.to_string(), here);
                    domains.push(domain);
                }
            }
            Err(mut file_errors) => errors.append(&mut file_errors),
        }
    }
    if errors.is_empty() {
        Ok(RateLimitConfig::new(domains, options.default_algorithm))
    } else {
        Err(ConfigErrors(errors))
    }
}

fn config_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let entries = fs::read_dir(dir).map_err(|error| {
        ConfigError::whole_file(
            dir,
            format!("cannot read the config directory: {error}; pass the directory that holds the *.yaml files"),
        )
    })?;
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let is_yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        // `is_file` follows symlinks, as the ConfigMap layout needs.
        if !name.starts_with('.') && is_yaml && entry.path().is_file() {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// Compiles the text of one config file, named `file` in errors.
pub fn compile_str(
    file: &str,
    text: &str,
    options: &LoadOptions,
) -> Result<DomainTree, Vec<ConfigError>> {
    let file: Arc<str> = file.into();
    let parsed: ConfigFile = serde_saphyr::from_str(text).map_err(|error| {
        let location = error.location().unwrap_or(Location::UNKNOWN);
        vec![ConfigError {
            file: file.to_string(),
            line: location.line(),
            column: location.column(),
            message: yaml_message(&error),
        }]
    })?;
    let mut compiler = Compiler {
        file: file.clone(),
        options,
        errors: Vec::new(),
    };
    let domain = match parsed.domain {
        Some(domain) if !domain.value.trim().is_empty() => domain.value,
        Some(domain) => {
            let at = compiler.location(&domain.referenced);
            compiler.error(&at, "`domain` is empty; write the domain Envoy's ratelimit filter sends, e.g. `domain: edge`");
            String::new()
        }
        None => {
            let at = SourceLocation {
                file: file.clone(),
                line: 1,
                column: 1,
            };
            compiler.error(&at, "`domain` is missing; every config file starts with `domain: NAME`, the domain Envoy's ratelimit filter sends");
            String::new()
        }
    };
    let root = compiler.level(&domain, &parsed.descriptors);
    if compiler.errors.is_empty() {
        Ok(DomainTree {
            name: domain.into(),
            file,
            root,
        })
    } else {
        Err(compiler.errors)
    }
}

/// The parser's own message, without its location prefix (we print ours) and with advice
/// that fits a config author rather than a library user.
fn yaml_message(error: &serde_saphyr::Error) -> String {
    let text = error.without_snippet().to_string();
    let first_line = text.lines().next().unwrap_or_default();
    let message = match first_line.strip_prefix("error: ") {
        Some(rest) => match rest.split_once(": ") {
            Some((prefix, message)) if prefix.starts_with("line ") => message,
            _ => rest,
        },
        None => first_line,
    };
    // Some messages repeat the location at the end; ours is already at the front.
    let message = match message.rfind(" at line ") {
        Some(at)
            if message
                .get(at..)
                .is_some_and(|tail| tail.contains(", column ")) =>
        {
            message.get(..at).unwrap_or(message)
        }
        _ => message,
    };
    match message.split_once(", set DuplicateKeyPolicy") {
        Some((duplicate, _)) => {
            format!("{duplicate}; a key may appear once per mapping, remove one of them")
        }
        None => message.to_owned(),
    }
}

struct Compiler<'a> {
    file: Arc<str>,
    options: &'a LoadOptions,
    errors: Vec<ConfigError>,
}

impl Compiler<'_> {
    fn location(&self, location: &Location) -> SourceLocation {
        SourceLocation {
            file: self.file.clone(),
            line: location.line(),
            column: location.column(),
        }
    }

    fn error(&mut self, at: &SourceLocation, message: impl Into<String>) {
        self.errors.push(ConfigError::at(at, message));
    }

    /// Compiles the descriptors of one level; `path` is the stat-style path of the parent.
    fn level(&mut self, path: &str, entries: &[DescriptorEntry]) -> Level {
        let mut level = Level::default();
        let mut seen: HashMap<(String, ValuePattern), u64> = HashMap::new();
        for entry in entries {
            let Some(key) = &entry.key else {
                let at = entry
                    .rate_limit
                    .as_ref()
                    .map(|block| self.location(&block.referenced))
                    .unwrap_or_else(|| self.location(&Location::UNKNOWN));
                self.error(&at, "a descriptor has no `key`; write the key Envoy sends, e.g. `key: remote_address`");
                continue;
            };
            let at = self.location(&key.referenced);
            if key.value.is_empty() {
                self.error(
                    &at,
                    "`key` is empty; write the key Envoy sends, e.g. `key: remote_address`",
                );
                continue;
            }
            let value = entry.value.as_ref().map(|value| value.value.as_str());
            let pattern = ValuePattern::parse(value);
            let node_path = match value {
                Some(value) if !value.is_empty() => format!("{path}.{}_{value}", key.value),
                _ => format!("{path}.{}", key.value),
            };
            if let Some(first_line) = seen.get(&(key.value.clone(), pattern.clone())) {
                let described = match value {
                    Some(value) if !value.is_empty() => format!("`{}: {value}`", key.value),
                    _ => format!("`{}` without a value", key.value),
                };
                self.error(&at, format!("the descriptor {described} is already defined at line {first_line} of this level; merge the two blocks"));
                continue;
            }
            seen.insert((key.value.clone(), pattern.clone()), at.line);
            let rule = entry
                .rate_limit
                .as_ref()
                .and_then(|block| self.rule(block, entry, &key.value, &node_path))
                .map(Arc::new);
            let children = self.level(&node_path, &entry.descriptors);
            level.insert(&key.value, pattern, Node { rule, children });
        }
        level
    }

    fn rule(
        &mut self,
        block: &Spanned<RateLimitBlock>,
        entry: &DescriptorEntry,
        key: &str,
        path: &str,
    ) -> Option<Rule> {
        let at = self.location(&block.referenced);
        let block_at = at.clone();
        let block = &block.value;
        let limit = if block.unlimited {
            if let Some(rpu) = &block.requests_per_unit {
                let at = self.location(&rpu.referenced);
                self.error(&at, format!("`unlimited: true` and `requests_per_unit` under key `{key}` contradict each other; remove one of them"));
                return None;
            }
            if let Some(unit) = &block.unit {
                let at = self.location(&unit.referenced);
                self.error(
                    &at,
                    format!("`unlimited: true` under key `{key}` takes no `unit`; remove it"),
                );
                return None;
            }
            RuleLimit::Unlimited
        } else {
            RuleLimit::Limited(self.limit(block, key, &block_at)?)
        };
        let mut replaces = Vec::new();
        for replaced in &block.replaces {
            match &replaced.name {
                Some(name) if !name.value.is_empty() => replaces.push(name.value.clone().into()),
                _ => self.error(&at, format!("an entry of `replaces` under key `{key}` has no `name`; write the `name` of the rate limit to replace")),
            }
        }
        Some(Rule {
            limit,
            name: block
                .name
                .as_ref()
                .filter(|name| !name.value.is_empty())
                .map(|name| name.value.clone().into()),
            replaces: replaces.into(),
            shadow_mode: entry.shadow_mode,
            detailed_metric: entry.detailed_metric,
            path: path.into(),
            source: at,
        })
    }

    fn limit(&mut self, block: &RateLimitBlock, key: &str, at: &SourceLocation) -> Option<Limit> {
        let units = "second, minute, hour, day, week, month or year";
        let unit = match &block.unit {
            None => {
                self.error(
                    at,
                    format!("`unit` is missing under key `{key}`; write one of {units}"),
                );
                None
            }
            Some(unit) => match unit.value.parse::<Unit>() {
                Ok(unit) => Some(unit),
                Err(()) => {
                    let at = self.location(&unit.referenced);
                    self.error(
                        &at,
                        format!(
                            "unknown unit `{}` under key `{key}`; write one of {units}",
                            unit.value
                        ),
                    );
                    None
                }
            },
        };
        let requests_per_unit = match &block.requests_per_unit {
            None => {
                self.error(at, format!("`requests_per_unit` is missing under key `{key}`; a limit of 0 would block every request — write a number, or `unlimited: true`"));
                None
            }
            Some(rpu) => match u32::try_from(rpu.value) {
                Ok(rpu) => Some(rpu),
                Err(_) => {
                    let at = self.location(&rpu.referenced);
                    self.error(&at, format!("`requests_per_unit` under key `{key}` is {}; write a whole number from 0 to {}", rpu.value, u32::MAX));
                    None
                }
            },
        };
        let algorithm = match &block.algorithm {
            None => Some(self.options.default_algorithm),
            Some(algorithm) => match algorithm.value.parse::<Algorithm>() {
                Ok(algorithm) => Some(algorithm),
                Err(()) => {
                    let at = self.location(&algorithm.referenced);
                    let known: Vec<_> = Algorithm::ALL.iter().map(|a| a.name()).collect();
                    self.error(
                        &at,
                        format!(
                            "unknown algorithm `{}` under key `{key}`; write one of {}",
                            algorithm.value,
                            known.join(", ")
                        ),
                    );
                    None
                }
            },
        };
        Some(Limit {
            requests_per_unit: requests_per_unit?,
            unit: unit?,
            algorithm: algorithm?,
        })
    }
}

#[cfg(test)]
mod tests;
