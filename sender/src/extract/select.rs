//! Table selection: include/exclude patterns over the source's catalog, and the
//! change column of each selected table. Every problem is reported at once, each
//! naming the table, the key to change and the options.

use super::{ChangeKind, ExtractError, TableMeta};
use crate::config::{Carry, Config, WithoutChangeColumn};
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
    /// A PostgreSQL partitioned table's layout (see [`super::TableMeta`]).
    pub partitions: Option<String>,
    /// The tables it inherits from (PostgreSQL `INHERITS`; not partitions).
    pub inherits: Vec<ferry_common::TableName>,
}

fn matches(patterns: &[glob::Pattern], name: &str) -> bool {
    patterns
        .iter()
        .any(|p| p.matches_with(name, crate::config::GLOB_OPTIONS))
}

/// The `[source] include` entries without wildcards that select no table: a
/// typo, or a table that is not there (yet), or one `exclude` removes.
pub fn missing_includes(config: &Config, selected: &HashSet<String>) -> Vec<String> {
    config
        .source
        .include
        .iter()
        .filter(|p| !p.contains(['*', '?', '[']))
        .filter(|p| {
            let Ok(pattern) = glob::Pattern::new(p) else {
                return false;
            };
            !selected
                .iter()
                .any(|n| pattern.matches_with(n, crate::config::GLOB_OPTIONS))
        })
        .cloned()
        .collect()
}

/// What `check` and the log say about an include that selects nothing.
pub fn missing_include_message(name: &str) -> String {
    format!(
        "`[source] include` names {name:?}, which selects no table: no such table (names are \
         `schema.table`), or `exclude` removes it"
    )
}

/// Once per process: a daemon's every partial would repeat it.
fn warn_once(name: &str) {
    static WARNED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let first = WARNED.lock().map_or(true, |mut w| {
        let new = !w.iter().any(|x| x == name);
        if new {
            w.push(name.to_owned());
        }
        new
    });
    if first {
        tracing::warn!("{}", missing_include_message(name));
    }
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
    // The `[partial.tables]` stanzas that apply to a selected table.
    let mut used: HashSet<&str> = HashSet::new();
    // Selected tables that inherit, with their parents.
    let mut heirs: Vec<(String, Vec<String>)> = Vec::new();
    for t in catalog {
        let key = t.info.name.to_string();
        if (!include.is_empty() && !matches(&include, &key)) || matches(&exclude, &key) {
            continue;
        }
        if !t.inherits.is_empty() {
            heirs.push((
                key.clone(),
                t.inherits.iter().map(|p| p.to_string()).collect(),
            ));
        }
        let rule = config.table_rule(&key);
        if let Some((k, _)) = rule {
            used.insert(k);
        }
        let policy = rule.and_then(|(_, r)| r.partial);
        let own_column = rule.and_then(|(_, r)| r.change_column.as_deref());
        let stanza = rule.map_or_else(
            || format!("[partial.tables.\"{key}\"]"),
            |(k, _)| format!("[partial.tables.\"{k}\"]"),
        );
        let has_pk = !t.info.primary_key.is_empty();
        let mut change = None;
        let mut carry = Carry::Complete;
        let mut auto = false;
        // The change column if this table is to be carried by changes: `None`
        // means the table lacks the default column and has no policy of its
        // own, so `without_change_column` decides.
        let column = match policy {
            Some(Carry::Complete) => None,
            Some(Carry::Whole) => {
                carry = Carry::Whole;
                None
            }
            Some(Carry::Changes) | None => {
                let col = own_column.or(config.partial.change_column.as_deref());
                let explicit = own_column.is_some() || policy == Some(Carry::Changes);
                let present = |c: &str| t.info.columns.iter().any(|x| x.name == c);
                match col {
                    Some(c) if present(c) => Some(c),
                    Some(c) if explicit => {
                        problems.push(format!(
                            "table {key} has no column {c:?} (change columns are case-sensitive; \
                             its columns are: {}); set `change_column` in `{stanza}`",
                            t.info
                                .columns
                                .iter()
                                .map(|c| c.name.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ));
                        None
                    }
                    None if explicit => {
                        problems.push(format!(
                            "table {key} has no change column: set `change_column` in `{stanza}` \
                             or `[partial] change_column`"
                        ));
                        None
                    }
                    _ => {
                        match config.partial.without_change_column {
                            WithoutChangeColumn::Auto => auto = true,
                            WithoutChangeColumn::Whole => carry = Carry::Whole,
                            WithoutChangeColumn::Complete => {}
                            WithoutChangeColumn::Error => problems.push(format!(
                                "table {key} has no change column{}: set `[partial] \
                                 change_column`, or `[partial.tables.\"{key}\"] change_column = \
                                 \"…\"`, or `partial = \"whole\"` or `\"complete\"` there (a \
                                 pattern such as `\"public.auth_*\"` covers many tables), or \
                                 `[partial] without_change_column = \"auto\"`",
                                col.map_or(String::new(), |c| format!(" {c:?}"))
                            )),
                        }
                        None
                    }
                }
            }
        };
        if let Some(col) = column {
            match t.change_kinds.get(col) {
                None => problems.push(if postgres {
                    format!(
                        "table {key}: change column {col:?} must be a timestamp, timestamptz \
                         or date column that every insert and update sets (integer ids are \
                         unsafe on PostgreSQL: a transaction that commits late with a lower \
                         id would be missed); add e.g. `updated_at timestamptz NOT NULL \
                         DEFAULT now()` kept current by the app or a trigger, or set \
                         `partial = \"whole\"` or `\"complete\"` in `{stanza}`"
                    )
                } else {
                    format!(
                        "table {key}: change column {col:?} must hold datetimes (text) or \
                         numbers"
                    )
                }),
                Some(kind) => {
                    change = Some((col.to_owned(), *kind));
                    carry = Carry::Changes;
                }
            }
        }
        if !has_pk && carry != Carry::Complete {
            problems.push(format!(
                "table {key} has no primary key, so partials cannot upsert or delete its \
                 rows: add a primary key, exclude it (`[source] exclude`), or set \
                 `partial = \"complete\"` in `{stanza}` to send it whole in completes only"
            ));
        }
        // Without a key a table can only travel in completes.
        auto &= has_pk;
        let change_indexed = change
            .as_ref()
            .is_some_and(|(c, _)| t.indexed_first.contains(c));
        let mut info = t.info;
        info.change_column = change.as_ref().map(|(c, _)| c.clone());
        selected.push(TableMeta {
            info,
            change,
            carry,
            auto,
            change_indexed,
            size_hint: t.size_hint,
            partitions: t.partitions,
        });
    }
    let names: HashSet<String> = selected.iter().map(TableMeta::key).collect();
    // Its DDL (`CREATE TABLE … INHERITS`) names the parent: without it the
    // receiver could not create the table.
    for (child, parents) in &heirs {
        for parent in parents.iter().filter(|p| !names.contains(*p)) {
            problems.push(format!(
                "table {child} inherits from {parent}, which is not selected: the receiver \
                 cannot create {child} without it; select {parent} too (each table travels \
                 with its own rows) or exclude {child}"
            ));
        }
    }
    for key in config.partial.tables.keys() {
        if !used.contains(key.as_str()) {
            problems.push(format!(
                "`[partial.tables.\"{key}\"]` applies to no selected table (names are \
                 `schema.table` and case-sensitive; a more specific stanza may cover them)"
            ));
        }
    }
    for name in missing_includes(config, &names) {
        warn_once(&name);
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
