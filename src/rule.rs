//! What a matched descriptor node says: a limit (or explicitly none), and how to report it.

use std::fmt;
use std::sync::Arc;

use crate::limit::Limit;

/// Where something was written: a config file, line and column (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceLocation {
    pub file: Arc<str>,
    pub line: u64,
    pub column: u64,
}

impl fmt::Display for SourceLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// The limits a rule applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleLimit {
    /// One or more limits, each with its own counter; over if any is over.
    Limited(Box<[Limit]>),
    /// `unlimited: true`: always OK, never counted, reported with u32::MAX remaining.
    Unlimited,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub limit: RuleLimit,
    /// Reported in `current_limit.name` and referenced by other rules' `replaces`.
    pub name: Option<Box<str>>,
    /// Names of rules this one switches off for the whole request when it matches.
    pub replaces: Box<[Box<str>]>,
    /// Counted and reported, but never turns a request away.
    pub shadow_mode: bool,
    pub detailed_metric: bool,
    /// The rule's place in the tree, like envoyproxy/ratelimit's stat key:
    /// `domain.key_value.key` (value-less keys have no `_value`).
    pub path: Box<str>,
    pub source: SourceLocation,
    /// Keep rejected hits counted: envoyproxy/ratelimit's fixed window does, so a migrated
    /// `rate_limit` rule rejects exactly what it did before. Policies never do.
    pub count_rejected: bool,
    /// How the rule was put together, one line per field with where it came from; shown by
    /// `meshlimit explain` and `/rlconfig`.
    pub provenance: Box<[String]>,
}
