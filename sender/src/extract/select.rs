//! Table selection: include/exclude patterns over the source's catalog, and the
//! change column of each selected table. Every problem is reported at once, each
//! naming the table, the key to change and the options.

use super::{ChangeKind, ExtractError, TableMeta};
use crate::config::Config;
use std::collections::{HashMap, HashSet};

/// A table as the catalog describes it, before selection.
#[derive(Debug, Clone)]
pub struct CatalogTable {
    pub info: ferry_common::manifest::Table,
    /// Columns usable as change columns, and how they compare.
    pub change_kinds: HashMap<String, ChangeKind>,
    /// Columns some index starts with.
    pub indexed_first: HashSet<String>,
    pub size_hint: i64,
}

fn matches(patterns: &[glob::Pattern], name: &str) -> bool {
    let opts = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: false,
        require_literal_leading_dot: false,
    };
    patterns.iter().any(|p| p.matches_with(name, opts))
}

/// Applies the configuration to the catalog. `postgres` selects the rules for
/// change columns (PostgreSQL accepts timestamps only, see docs/change-capture.md).
pub fn resolve(
    config: &Config,
    catalog: Vec<CatalogTable>,
    postgres: bool,
) -> Result<Vec<TableMeta>, ExtractError> {
    let compile = |ps: &[String]| -> Vec<glob::Pattern> {
        ps.iter()
            .filter_map(|p| glob::Pattern::new(p).ok())
            .collect()
    };
    let include = compile(&config.source.include);
    let exclude = compile(&config.source.exclude);
    let mut problems = Vec::new();
    let mut selected = Vec::new();
    for t in catalog {
        let key = t.info.name.to_string();
        if (!include.is_empty() && !matches(&include, &key)) || matches(&exclude, &key) {
            continue;
        }
        let partial = config.partial_enabled(&key);
        let mut change = None;
        if partial {
            match config.change_column(&key) {
                None => problems.push(format!(
                    "table {key} has no change column: set `[partial] change_column`, or \
                     `[partial.tables.\"{key}\"] change_column = \"…\"`, or \
                     `[partial.tables.\"{key}\"] partial = false` to send it in completes only"
                )),
                Some(col) if !t.info.columns.iter().any(|c| c.name == col) => {
                    problems.push(format!(
                        "table {key} has no column {col:?} (change columns are case-sensitive; \
                         its columns are: {}); set `[partial.tables.\"{key}\"] change_column`",
                        t.info
                            .columns
                            .iter()
                            .map(|c| c.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                }
                Some(col) => match t.change_kinds.get(col) {
                    None => problems.push(if postgres {
                        format!(
                            "table {key}: change column {col:?} must be a timestamp, timestamptz \
                             or date column that every insert and update sets (integer ids are \
                             unsafe on PostgreSQL: a transaction that commits late with a lower \
                             id would be missed); add e.g. `updated_at timestamptz NOT NULL \
                             DEFAULT now()` kept current by the app or a trigger"
                        )
                    } else {
                        format!(
                            "table {key}: change column {col:?} must hold datetimes (text) or \
                             numbers"
                        )
                    }),
                    Some(kind) => change = Some((col.to_owned(), *kind)),
                },
            }
            if t.info.primary_key.is_empty() {
                problems.push(format!(
                    "table {key} has no primary key, so partials cannot upsert or delete its \
                     rows: add a primary key, exclude it (`[source] exclude`), or set \
                     `[partial.tables.\"{key}\"] partial = false` to send it whole in completes only"
                ));
            }
        }
        let change_indexed = change
            .as_ref()
            .is_some_and(|(c, _)| t.indexed_first.contains(c));
        let mut info = t.info;
        info.change_column = change.as_ref().map(|(c, _)| c.clone());
        selected.push(TableMeta {
            info,
            change,
            change_indexed,
            size_hint: t.size_hint,
        });
    }
    let names: HashSet<String> = selected.iter().map(TableMeta::key).collect();
    for key in config.partial.tables.keys() {
        if !names.contains(key) {
            problems.push(format!(
                "`[partial.tables.\"{key}\"]` names no selected table (names are \
                 `schema.table` and case-sensitive)"
            ));
        }
    }
    if selected.is_empty() {
        problems.push(
            "no table is selected: check `[source] include` and `exclude` against the \
             database's tables (`ferry-sender check` lists them)"
                .into(),
        );
    }
    // Foreign keys only matter between selected tables.
    for t in &mut selected {
        t.info
            .foreign_keys
            .retain(|fk| names.contains(&fk.references.to_string()));
    }
    if problems.is_empty() {
        Ok(selected)
    } else {
        Err(ExtractError::Selection(problems.join("\n")))
    }
}
