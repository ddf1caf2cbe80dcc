//! Loading a config directory: finding the files, parsing the YAML, and compiling each
//! domain's descriptors into a `DomainTree` that requests are matched against.
//!
//! Everything is checked at load time and every problem is reported with its file, line
//! and column, so a bad config never reaches the request path.

mod compile;
pub mod error;
mod file;
mod policy;

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_saphyr::{Location, Spanned};

use compile::{Compiler, Inherited};
pub use error::{ConfigError, ConfigErrors};
use file::{CapacityBlock, ConfigFile, DescriptorEntry, PolicyFields, merge_descriptors};
use policy::{PolicyDefinition, PolicyTable, Scope, location};

use crate::limit::{Algorithm, Limit, Unit, parse_duration};
use crate::matcher::{Capacity, DomainTree, RateLimitConfig};
use crate::rule::SourceLocation;

/// The largest config file read. A Kubernetes ConfigMap holds at most 1 MiB and a config
/// of thousands of descriptors takes a few hundred KiB; without a bound, a file put in the
/// directory by mistake (a log, a dump) would be read whole on every reload check.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// The longest `extends` chain, of domains or of policies. Real configs use two or three
/// levels; resolving a chain recurses, and thousands of levels overflowed the 2 MiB stack
/// of the thread that reloads the config, killing the process.
pub const MAX_EXTENDS_DEPTH: usize = 32;

/// Choices that apply to every file of a load.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// The algorithm of rules that do not name one.
    pub default_algorithm: Algorithm,
    /// The largest limit a `sliding_log` rule may have (it keeps one timestamp per hit).
    pub max_sliding_log_limit: u32,
    /// envoyproxy/ratelimit's MERGE_DOMAIN_CONFIG: files naming the same domain add their
    /// descriptors to it instead of being an error.
    pub merge_domains: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            default_algorithm: Algorithm::default(),
            max_sliding_log_limit: 1_000,
            merge_domains: false,
        }
    }
}

/// Loads every `*.yaml` / `*.yml` file directly inside `dir`.
///
/// Names starting with a dot are skipped: that covers editor swap files and the `..data`
/// and `..2024_…` entries Kubernetes creates when it mounts a ConfigMap (the visible file
/// names are symlinks through `..data`, so each file is still read once).
pub fn load_dir(dir: &Path, options: &LoadOptions) -> Result<RateLimitConfig, ConfigErrors> {
    let files = config_files(dir).map_err(|error| ConfigErrors(vec![error]))?;
    let texts = files.into_iter().map(|path| {
        let label: Arc<str> = path.display().to_string().into();
        let text = read_text(&path);
        (label, text)
    });
    load_texts(texts, options)
}

/// Loads config files given as text, each named by its label in errors, exactly as
/// `load_dir` loads a directory's: for configs that arrive another way (xDS). A file that
/// could not be read is passed as its error, reported with the others.
pub fn load_texts(
    texts: impl IntoIterator<Item = (Arc<str>, Result<String, ConfigError>)>,
    options: &LoadOptions,
) -> Result<RateLimitConfig, ConfigErrors> {
    let mut parsed = Vec::new();
    let mut errors = Vec::new();
    for (label, text) in texts {
        match text.and_then(|text| parse(&label, &text)) {
            Ok(file) => parsed.push((label, file)),
            Err(error) => errors.push(error),
        }
    }
    match compile_files(parsed, options) {
        Ok(config) if errors.is_empty() => Ok(config),
        Ok(_) => Err(ConfigErrors(errors)),
        Err(mut more) => {
            errors.append(&mut more);
            Err(ConfigErrors(errors))
        }
    }
}

/// Reads the text of every config file in `dir`, for change detection: hot reload compares
/// this snapshot rather than trusting modification times, which a ConfigMap's symlink swap
/// does not reliably change.
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    config_files(dir)
        .unwrap_or_default()
        .into_iter()
        .map(|path| {
            let bytes = read_bounded(&path).unwrap_or_default();
            (path, bytes)
        })
        .collect()
}

/// At most `MAX_FILE_BYTES + 1` bytes of `path`: enough to tell that it is too big.
fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    fs::File::open(path)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn read_text(path: &Path) -> Result<String, ConfigError> {
    let bytes = read_bounded(path)
        .map_err(|error| ConfigError::whole_file(path, format!("cannot read the file: {error}")))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        let size = fs::metadata(path).map_or(bytes.len() as u64, |m| m.len());
        return Err(ConfigError::whole_file(
            path,
            format!(
                "the file is {size} bytes; a config file may hold at most {MAX_FILE_BYTES} bytes (4 MiB). \
                 Check that it is the file you meant, or split its domains into files of their own"
            ),
        ));
    }
    String::from_utf8(bytes).map_err(|_| {
        ConfigError::whole_file(path, "the file is not valid UTF-8; save it as UTF-8 text")
    })
}

/// Entries of `dir` a user may expect to be read that `load_dir` skips: files not named
/// `*.yaml`/`*.yml`, and subdirectories (envoyproxy/ratelimit reads every file, in
/// subdirectories too). Dot-names are skipped silently, as they should be.
pub fn skipped_entries(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut skipped: Vec<PathBuf> = entries
        .flatten()
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let is_yaml = name.ends_with(".yaml") || name.ends_with(".yml");
            let path = entry.path();
            !name.starts_with('.') && (path.is_dir() || (path.is_file() && !is_yaml))
        })
        .map(|entry| entry.path())
        .collect();
    skipped.sort();
    skipped
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

fn parse(file: &Arc<str>, text: &str) -> Result<ConfigFile, ConfigError> {
    let mut parsed: ConfigFile = serde_saphyr::from_str_with_options(text, yaml_options())
        .map_err(|error| yaml_error(file, &error))?;
    for entry in &mut parsed.descriptors {
        entry.set_file(file);
    }
    Ok(parsed)
}

/// The parser's error at its location in `file`, in words for whoever wrote the file.
pub(crate) fn yaml_error(file: &str, error: &serde_saphyr::Error) -> ConfigError {
    let location = error.location().unwrap_or(Location::UNKNOWN);
    ConfigError {
        file: file.to_owned(),
        line: location.line(),
        column: location.column(),
        message: yaml_message(error),
    }
}

/// The parser's budget, tighter than serde-saphyr's defaults where aliases are concerned.
/// The defaults stop an alias bomb ("billion laughs") only after a million replayed
/// events, by which time an 800-byte file has taken 160 MB; with these it takes about 50
/// MB, as much as the largest file `MAX_FILE_BYTES` admits. A config that reuses a block
/// through anchors replays hundreds of events, not millions. The other defaults (64
/// levels of nesting, 250 000 nodes) already bound what a file may hold.
pub(crate) fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_recorded_anchor_events: ALIAS_EVENTS,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: ALIAS_EVENTS,
        },
    }
}

/// The most parser events aliases may replay, and anchors may record, in one file.
const ALIAS_EVENTS: usize = 100_000;

/// Compiles the text of one config file on its own (no shared files), named `file` in
/// errors. A file with no `domain` is an error here.
pub fn compile_str(
    file: &str,
    text: &str,
    options: &LoadOptions,
) -> Result<DomainTree, Vec<ConfigError>> {
    let label: Arc<str> = file.into();
    let parsed = parse(&label, text).map_err(|error| vec![error])?;
    if parsed.domain.is_none() {
        return Err(vec![ConfigError::at(
            &start_of(&label),
            "`domain` is missing; every config file starts with `domain: NAME`, the domain Envoy's ratelimit filter sends",
        )]);
    }
    let mut config = compile_files(vec![(label, parsed)], options)?;
    config.take_domains().pop().ok_or_else(|| {
        vec![ConfigError::at(
            &start_of(&file.into()),
            "no domain was compiled",
        )]
    })
}

fn start_of(file: &Arc<str>) -> SourceLocation {
    SourceLocation {
        file: file.clone(),
        line: 1,
        column: 1,
    }
}

/// A domain file after `extends` is applied.
struct DomainSource {
    file: Arc<str>,
    descriptors: Vec<DescriptorEntry>,
    policies: HashMap<String, PolicyDefinition>,
    defaults: Option<(Arc<str>, Spanned<PolicyFields>)>,
    capacity: Option<(Arc<str>, Spanned<CapacityBlock>)>,
}

/// `--merge-domain-config`: adds a second file's descriptors to the domain `name` first
/// defined in `first`. Only descriptors merge: what shapes the whole domain (`extends`,
/// `policies`, `defaults`, `capacity`) must be written once, in the first file.
fn merge_into(
    name: &str,
    first: &Arc<str>,
    at: &SourceLocation,
    parsed: ConfigFile,
    domain_files: &mut [(String, Arc<str>, ConfigFile)],
    errors: &mut Vec<ConfigError>,
) {
    let domain_wide = [
        ("extends", parsed.extends.is_some()),
        ("policies", !parsed.policies.is_empty()),
        ("defaults", parsed.defaults.is_some()),
        ("capacity", parsed.capacity.is_some()),
    ];
    if let Some((field, _)) = domain_wide.iter().find(|(_, set)| *set) {
        errors.push(ConfigError::at(at, format!("domain `{name}` is also defined in {first}; merged files may only add descriptors, so move `{field}` to {first}")));
        return;
    }
    if let Some((_, _, target)) = domain_files.iter_mut().find(|(n, _, _)| n == name) {
        target.descriptors.extend(parsed.descriptors);
    }
}

/// Compiles parsed files together: shared files offer policies and defaults to every
/// domain; each domain file becomes one tree.
fn compile_files(
    files: Vec<(Arc<str>, ConfigFile)>,
    options: &LoadOptions,
) -> Result<RateLimitConfig, Vec<ConfigError>> {
    let mut errors = Vec::new();
    let mut shared_policies: HashMap<String, PolicyDefinition> = HashMap::new();
    let mut shared_defaults: Option<(Arc<str>, Spanned<PolicyFields>)> = None;
    let mut domain_files: Vec<(String, Arc<str>, ConfigFile)> = Vec::new();
    let mut first_seen: HashMap<String, Arc<str>> = HashMap::new();
    for (file, parsed) in files {
        let Some(domain) = parsed.domain.as_ref() else {
            shared_file(
                &file,
                parsed,
                &mut shared_policies,
                &mut shared_defaults,
                &mut errors,
            );
            continue;
        };
        let name = domain.value.trim().to_owned();
        if name.is_empty() {
            errors.push(ConfigError::at(&location(&file, &domain.referenced), "`domain` is empty; write the domain Envoy's ratelimit filter sends, e.g. `domain: edge`"));
            continue;
        }
        if let Some(first) = first_seen.get(&name) {
            let at = location(&file, &domain.referenced);
            if !options.merge_domains {
                errors.push(ConfigError::at(&at, format!("domain `{name}` is already defined in {first}; each domain lives in one file, so merge the two (or pass --merge-domain-config, envoyproxy/ratelimit's MERGE_DOMAIN_CONFIG)")));
                continue;
            }
            merge_into(&name, first, &at, parsed, &mut domain_files, &mut errors);
            continue;
        }
        first_seen.insert(name.clone(), file.clone());
        domain_files.push((name, file, parsed));
    }

    let mut sources: HashMap<String, DomainSource> = HashMap::new();
    for (name, _, _) in &domain_files {
        let mut chain = Vec::new();
        resolve_domain(name, &domain_files, &mut sources, &mut chain, &mut errors);
    }
    let mut trees = Vec::new();
    for (name, _, _) in &domain_files {
        let Some(source) = sources.remove(name) else {
            continue;
        };
        let mut table = PolicyTable::new(&shared_policies, source.policies, name);
        let mut compiler = Compiler {
            table: &mut table,
            default_algorithm: options.default_algorithm,
            max_sliding_log: options.max_sliding_log_limit,
            errors: Vec::new(),
        };
        let inherited = match (&source.defaults, &shared_defaults) {
            (Some((file, fields)), _) => {
                compiler.defaults(fields, file, "domain defaults", Scope::Domain(name))
            }
            // Seen from the domain, so a policy the domain defines under a shared name
            // (shadowing it, as everywhere else in the domain) is the one its nodes get.
            (None, Some((file, fields))) => {
                compiler.defaults(fields, file, "shared defaults", Scope::Domain(name))
            }
            (None, None) => Inherited::Nothing,
        };
        let root = compiler.level(name, &[], &source.descriptors, &inherited, &source.file);
        errors.append(&mut compiler.errors);
        let mut tree = DomainTree {
            name: name.as_str().into(),
            file: source.file,
            root,
            capacity: None,
        };
        if let Some((file, block)) = &source.capacity {
            tree.capacity = capacity(&tree, file, block, &mut errors);
        } else if let Some(rule) = tree
            .rules()
            .into_iter()
            .find(|rule| rule.treatment.reserved > 0)
        {
            // A share set aside of a capacity the domain does not have would do nothing.
            errors.push(ConfigError::at(&rule.source, format!("the policy of `{}` reserves a share of domain `{name}`'s `capacity`, but the domain declares none; add `capacity: {{requests_per_unit: 1000, unit: second}}` to the domain (what all its traffic may use), or remove `reserved`", rule.path)));
        }
        trees.push(tree);
    }
    if errors.is_empty() {
        Ok(RateLimitConfig::new(trees, options.default_algorithm))
    } else {
        Err(errors)
    }
}

fn shared_file(
    file: &Arc<str>,
    parsed: ConfigFile,
    policies: &mut HashMap<String, PolicyDefinition>,
    defaults: &mut Option<(Arc<str>, Spanned<PolicyFields>)>,
    errors: &mut Vec<ConfigError>,
) {
    if parsed.policies.is_empty() && parsed.defaults.is_none() {
        errors.push(ConfigError::at(&start_of(file), "`domain` is missing; every config file starts with `domain: NAME`, the domain Envoy's ratelimit filter sends (a file without a domain may only hold shared `policies` and `defaults`)"));
        return;
    }
    if let Some(first) = parsed.descriptors.first() {
        let at = first
            .key
            .as_ref()
            .map(|k| location(file, &k.referenced))
            .unwrap_or_else(|| start_of(file));
        errors.push(ConfigError::at(&at, "a file without `domain` cannot hold `descriptors`; add `domain: NAME`, or move them to that domain's file"));
    }
    if let Some(extends) = &parsed.extends {
        errors.push(ConfigError::at(
            &location(file, &extends.referenced),
            "`extends` names a domain to start from, so it needs a `domain` in the same file",
        ));
    }
    for (name, block) in parsed.policies {
        if let Some(existing) = policies.get(&name) {
            errors.push(ConfigError::at(
                &location(file, &block.referenced),
                format!(
                    "shared policy `{name}` is already defined in {}; rename one of them",
                    existing.file
                ),
            ));
            continue;
        }
        policies.insert(
            name,
            PolicyDefinition {
                block,
                file: file.clone(),
            },
        );
    }
    if let Some(fields) = parsed.defaults {
        match defaults {
            Some((first, _)) => errors.push(ConfigError::at(
                &location(file, &fields.referenced),
                format!(
                    "shared `defaults` are already set in {first}; keep one set of shared defaults"
                ),
            )),
            None => *defaults = Some((file.clone(), fields)),
        }
    }
}

/// Builds a domain's source, following `extends` through the base domains first.
fn resolve_domain(
    name: &str,
    files: &[(String, Arc<str>, ConfigFile)],
    sources: &mut HashMap<String, DomainSource>,
    chain: &mut Vec<String>,
    errors: &mut Vec<ConfigError>,
) -> bool {
    if sources.contains_key(name) {
        return true;
    }
    let Some((_, file, parsed)) = files.iter().find(|(n, _, _)| n == name) else {
        return false;
    };
    let own_policies = || -> HashMap<String, PolicyDefinition> {
        parsed
            .policies
            .iter()
            .map(|(n, block)| {
                (
                    n.clone(),
                    PolicyDefinition {
                        block: block.clone(),
                        file: file.clone(),
                    },
                )
            })
            .collect()
    };
    let own_defaults = parsed.defaults.clone().map(|d| (file.clone(), d));
    let own_capacity = parsed.capacity.clone().map(|c| (file.clone(), c));
    let Some(base_name) = &parsed.extends else {
        sources.insert(
            name.to_owned(),
            DomainSource {
                file: file.clone(),
                descriptors: parsed.descriptors.clone(),
                policies: own_policies(),
                defaults: own_defaults,
                capacity: own_capacity,
            },
        );
        return true;
    };
    let at = location(file, &base_name.referenced);
    if chain.iter().any(|n| n == &base_name.value) || base_name.value == name {
        let mut cycle = chain.clone();
        cycle.push(name.to_owned());
        cycle.push(base_name.value.clone());
        errors.push(ConfigError::at(
            &at,
            format!(
                "domain `extends` chain is a cycle: {}; remove one of the `extends`",
                cycle.join(" extends ")
            ),
        ));
        return false;
    }
    if chain.len() + 1 >= MAX_EXTENDS_DEPTH {
        errors.push(ConfigError::at(
            &at,
            format!(
                "domain `extends` chains may be at most {MAX_EXTENDS_DEPTH} domains long, and this one goes on: {} extends … extends {name} extends {}; let the domains extend a common base instead",
                chain.first().map_or(name, String::as_str),
                base_name.value
            ),
        ));
        return false;
    }
    chain.push(name.to_owned());
    let found = resolve_domain(&base_name.value, files, sources, chain, errors);
    chain.pop();
    if !found {
        if !files.iter().any(|(n, _, _)| n == &base_name.value) {
            let known: Vec<&str> = files.iter().map(|(n, _, _)| n.as_str()).collect();
            errors.push(ConfigError::at(
                &at,
                format!(
                    "domain `{name}` extends unknown domain `{}`; known domains: {}",
                    base_name.value,
                    known.join(", ")
                ),
            ));
        }
        return false;
    }
    let Some(base) = sources.get(&base_name.value) else {
        return false;
    };
    let mut policies = base.policies.clone();
    policies.extend(own_policies());
    let source = DomainSource {
        file: file.clone(),
        descriptors: merge_descriptors(&base.descriptors, &parsed.descriptors),
        policies,
        defaults: own_defaults.or_else(|| base.defaults.clone()),
        capacity: own_capacity.or_else(|| base.capacity.clone()),
    };
    sources.insert(name.to_owned(), source);
    true
}

/// A domain's shared capacity with the share each priority may use.
fn capacity(
    tree: &DomainTree,
    file: &Arc<str>,
    block: &Spanned<CapacityBlock>,
    errors: &mut Vec<ConfigError>,
) -> Option<Capacity> {
    let at = location(file, &block.referenced);
    let block = &block.value;
    let total = match u32::try_from(block.requests_per_unit.value) {
        Ok(total) if total > 0 => total,
        _ => {
            errors.push(ConfigError::at(&location(file, &block.requests_per_unit.referenced), format!("capacity `requests_per_unit` is {}; write the most requests the whole domain may serve per window, at least 1", block.requests_per_unit.value)));
            return None;
        }
    };
    let window_millis = match (&block.unit, &block.per) {
        (Some(unit), None) => unit.value.parse::<Unit>().ok().map(Unit::millis),
        (None, Some(per)) => parse_duration(&per.value),
        _ => None,
    };
    let Some(window_millis) = window_millis else {
        errors.push(ConfigError::at(&at, "`capacity` needs one window: `unit:` (second, minute, hour, day, week, month or year) or `per:` with a duration such as `1s`"));
        return None;
    };
    let mut reservations: Vec<(i64, u64)> = Vec::new();
    for rule in tree.rules() {
        let treatment = &rule.treatment;
        if treatment.reserved == 0 {
            continue;
        }
        let reserved = policy::Ratio(treatment.reserved).of(u64::from(total));
        match reservations
            .iter_mut()
            .find(|(p, _)| *p == treatment.priority)
        {
            Some((_, existing)) => *existing = (*existing).max(reserved),
            None => reservations.push((treatment.priority, reserved)),
        }
    }
    let reserved_total: u64 = reservations.iter().map(|(_, r)| r).sum();
    if reserved_total > u64::from(total) {
        errors.push(ConfigError::at(&at, format!("the policies of domain `{}` reserve {reserved_total} of a capacity of {total}; lower their `reserved` fractions so they add up to at most 1", tree.name)));
        return None;
    }
    reservations.sort_by_key(|(priority, _)| std::cmp::Reverse(*priority));
    Some(Capacity {
        limit: Limit {
            requests_per_unit: total,
            window_millis,
            algorithm: Algorithm::SlidingWindow,
            burst: None,
            hybrid: false,
            calendar: None,
        },
        reservations,
        source: at,
    })
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
    // The parser's budget names only its counter; say what it means for a config file.
    if message.starts_with("budget breached") || message.starts_with("alias replay") {
        let counter = message.split(" at line ").next().unwrap_or(message);
        return format!(
            "{counter}; the file is larger, deeper or expands more aliases than a config file may \
             (64 levels of nesting, 250000 values, {ALIAS_EVENTS} events replayed by aliases): \
             split it into files, flatten it, or write repeated blocks out"
        );
    }
    // The parser's advice is for its caller; what a config author can do is different.
    if message.starts_with("multiple YAML documents detected") {
        return "a second YAML document (after a `---` line) starts here; a config file holds one \
                domain (or the shared policies): move the rest into a file of its own"
            .to_owned();
    }
    // A number field given something else (`3.5` or `ten` where a count goes): the parser
    // names only the type it wanted.
    match message {
        "invalid i64" | "invalid u64" | "invalid u32" | "invalid i32" => {
            return "expected a whole number such as 10 (no decimal point, no quotes)".to_owned();
        }
        "invalid f64" | "invalid f32" | "invalid floating point" => {
            return "expected a number such as 0.5 (no quotes)".to_owned();
        }
        _ => {}
    }
    match message.split_once(", set DuplicateKeyPolicy") {
        Some((duplicate, _)) => {
            format!("{duplicate}; a key may appear once per mapping, remove one of them")
        }
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests;
