//! pg_dump's post-data, split for a staged load: each table's own indexes,
//! primary key and unique constraints can be built on its copy connection right
//! after its data is in (side by side with the other tables' copies), while the
//! rest (foreign keys, triggers, rules, index attachments…) runs in the swap,
//! once every table is in place.
//!
//! Only what is certainly safe moves: an `INDEX` or `CONSTRAINT` entry made of
//! one statement of the exact form pg_dump prints for a plain table
//! (`ALTER TABLE ONLY <table> ADD CONSTRAINT …`, `CREATE [UNIQUE] INDEX <name>
//! ON <table> USING …`) that names no other object in the dumped schemas (an
//! app function or operator class there would still be the previous copy's).
//! Everything else stays in the swap, exactly as before.

use ferry_common::TableName;
use ferry_common::ident::quote_ident;
use std::collections::HashMap;

/// The post-data, split.
#[derive(Debug, Default)]
pub struct Split {
    /// Per table: a script building its indexes and constraints on its staging
    /// table (`stage` names), with pg_dump's session settings first.
    pub per_table: HashMap<TableName, String>,
    /// Everything else, for the swap (the moved statements removed).
    pub rest: String,
}

/// Splits `post` (pg_dump's plain post-data). `tables` pairs each table with the
/// quoted name of its staging table; `schemas` are the dumped schemas.
pub fn split(post: &str, tables: &[(TableName, String)], schemas: &[&str]) -> Split {
    let lines: Vec<&str> = post.split_inclusive('\n').collect();
    let is_header = |i: usize| {
        i + 2 < lines.len()
            && lines[i].trim_end() == "--"
            && lines[i + 1].starts_with("-- Name: ")
            && lines[i + 2].trim_end() == "--"
    };
    let headers: Vec<usize> = (0..lines.len()).filter(|&i| is_header(i)).collect();
    let Some(&first) = headers.first() else {
        return Split {
            per_table: HashMap::new(),
            rest: post.to_owned(),
        };
    };
    // Session settings every script needs, and the tablespace / access method
    // pg_dump sets between entries when they change.
    let mut session = String::new();
    let mut placement: [Option<&str>; 2] = [None, None];
    for line in &lines[..first] {
        if !track(line, &mut placement)
            && (line.starts_with("SET ") || line.starts_with("SELECT pg_catalog.set_config("))
        {
            session.push_str(line);
        }
    }
    let mut moved = vec![false; lines.len()];
    let mut per_table: HashMap<TableName, String> = HashMap::new();
    for (k, &h) in headers.iter().enumerate() {
        let end = headers.get(k + 1).copied().unwrap_or(lines.len());
        let kind = entry_type(lines[h + 1]);
        let before = placement;
        let mut statement = Vec::new();
        for (i, l) in lines.iter().enumerate().take(end).skip(h + 3) {
            if track(l, &mut placement) || l.trim().is_empty() || l.starts_with("--") {
                continue;
            }
            statement.push(i);
        }
        if !matches!(kind, Some("INDEX" | "CONSTRAINT")) || statement.is_empty() {
            continue;
        }
        let text: String = statement.iter().map(|&i| lines[i]).collect();
        let Some((table, rewritten)) = rewrite(&text, tables, schemas) else {
            continue;
        };
        let script = per_table.entry(table).or_insert_with(|| session.clone());
        for set in before.iter().flatten() {
            script.push_str(set);
        }
        script.push_str(&rewritten);
        if !rewritten.ends_with('\n') {
            script.push('\n');
        }
        for i in statement {
            moved[i] = true;
        }
    }
    let rest = lines
        .iter()
        .zip(&moved)
        .filter(|(_, m)| !**m)
        .map(|(l, _)| *l)
        .collect();
    Split { per_table, rest }
}

/// Notes a `SET default_tablespace` / `SET default_table_access_method` line
/// (pg_dump writes one before an entry when it changes); whether it was one.
fn track<'a>(line: &'a str, placement: &mut [Option<&'a str>; 2]) -> bool {
    let t = line.trim_start();
    if t.starts_with("SET default_tablespace ") {
        placement[0] = Some(line);
        true
    } else if t.starts_with("SET default_table_access_method ") {
        placement[1] = Some(line);
        true
    } else {
        false
    }
}

/// `X` of a `-- Name: …; Type: X; Schema: …` line.
fn entry_type(line: &str) -> Option<&str> {
    let (_, after) = line.split_once("; Type: ")?;
    Some(after.split_once("; Schema:")?.0)
}

/// The statement with its table's name replaced by the staging one, when it is
/// one of the two forms that can move.
fn rewrite(
    statement: &str,
    tables: &[(TableName, String)],
    schemas: &[&str],
) -> Option<(TableName, String)> {
    let s = statement.trim_end();
    // One statement only: a `;` anywhere but at the end (a string literal, a
    // second statement) keeps it in the swap.
    if !s.ends_with(';') || s[..s.len() - 1].contains(';') {
        return None;
    }
    for (table, stage) in tables {
        for q in dump_names(table) {
            let found = if let Some(after) = s.strip_prefix(&format!("ALTER TABLE ONLY {q}")) {
                after
                    .trim_start()
                    .starts_with("ADD CONSTRAINT ")
                    .then(|| (format!("ALTER TABLE ONLY {stage}"), after))
            } else {
                index_prefix(s)
                    .and_then(|(head, after)| {
                        after
                            .strip_prefix(&format!("ON {q} USING "))
                            .map(|a| (head, a))
                    })
                    .map(|(head, after)| (format!("{head}ON {stage} USING "), after))
            };
            let Some((head, after)) = found else { continue };
            if names_a_dumped_schema(after, schemas) {
                return None;
            }
            return Some((table.clone(), format!("{head}{after}\n")));
        }
    }
    None
}

/// `CREATE [UNIQUE] INDEX <name> ` and what follows it.
fn index_prefix(s: &str) -> Option<(&str, &str)> {
    let rest = s
        .strip_prefix("CREATE INDEX ")
        .or_else(|| s.strip_prefix("CREATE UNIQUE INDEX "))?;
    let name_len = if let Some(quoted) = rest.strip_prefix('"') {
        // A quoted name ends at a `"` that is not doubled.
        let b = quoted.as_bytes();
        let mut i = 0;
        loop {
            match b.get(i)? {
                b'"' if b.get(i + 1) == Some(&b'"') => i += 2,
                b'"' => break i + 2,
                _ => i += 1,
            }
        }
    } else {
        rest.find(' ')?
    };
    let after = rest[name_len..].strip_prefix(' ')?;
    Some((&s[..s.len() - after.len()], after))
}

/// Whether `sql` mentions `schema.` for a dumped schema, quoted either way.
fn names_a_dumped_schema(sql: &str, schemas: &[&str]) -> bool {
    schemas.iter().any(|s| {
        [dump_ident(s), quote_ident(s)]
            .iter()
            .any(|q| sql.contains(&format!("{q}.")))
    })
}

/// The ways pg_dump may have written a table's name: each part bare when it
/// is a plain lower-case identifier (pg_dump also quotes key words, which the
/// fully quoted spelling covers), or quoted.
fn dump_names(t: &TableName) -> Vec<String> {
    let schema = t.schema.as_deref().unwrap_or("public");
    let mut out = Vec::new();
    for s in [dump_ident(schema), quote_ident(schema)] {
        for n in [dump_ident(&t.name), quote_ident(&t.name)] {
            let q = format!("{s}.{n}");
            if !out.contains(&q) {
                out.push(q);
            }
        }
    }
    out
}

/// An identifier as pg_dump prints it when it needs no quotes.
fn dump_ident(s: &str) -> String {
    let plain = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain { s.to_owned() } else { quote_ident(s) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POST: &str = "--\n-- PostgreSQL database dump\n--\n\nSET statement_timeout = 0;\n\
SELECT pg_catalog.set_config('search_path', '', false);\nSET client_min_messages = warning;\n\n\
SET default_tablespace = '';\n\n\
--\n-- Name: events events_pkey; Type: CONSTRAINT; Schema: public; Owner: -\n--\n\n\
ALTER TABLE ONLY public.events\n    ADD CONSTRAINT events_pkey PRIMARY KEY (id);\n\n\n\
--\n-- Name: events_kind; Type: INDEX; Schema: public; Owner: -\n--\n\n\
CREATE INDEX events_kind ON public.events USING btree (kind) WHERE (kind <> 'x'::text);\n\n\n\
--\n-- Name: by_f; Type: INDEX; Schema: public; Owner: -\n--\n\n\
CREATE INDEX by_f ON public.events USING btree (public.f(kind));\n\n\n\
SET default_tablespace = fast;\n\n\
--\n-- Name: Odd \"Name\" Odd_pkey; Type: CONSTRAINT; Schema: public; Owner: -\n--\n\n\
ALTER TABLE ONLY public.\"Odd \"\"Name\"\"\"\n    ADD CONSTRAINT \"Odd_pkey\" PRIMARY KEY (k);\n\n\n\
--\n-- Name: \"Odd idx\"; Type: INDEX; Schema: public; Owner: -\n--\n\n\
CREATE UNIQUE INDEX \"Odd \"\" ON public.events USING \" ON public.\"Odd \"\"Name\"\"\" USING btree (k);\n\n\n\
--\n-- Name: child fk; Type: FK CONSTRAINT; Schema: public; Owner: -\n--\n\n\
ALTER TABLE ONLY public.child\n    ADD CONSTRAINT fk FOREIGN KEY (e) REFERENCES public.events(id);\n\n\n\
--\n-- Name: child t; Type: TRIGGER; Schema: public; Owner: -\n--\n\n\
CREATE TRIGGER t AFTER INSERT ON public.child FOR EACH ROW EXECUTE FUNCTION public.g();\n\n\n\
--\n-- Name: child_x; Type: INDEX; Schema: public; Owner: -\n--\n\n\
CREATE INDEX child_x ON ONLY public.child USING btree (x);\n\n\n\
--\n-- PostgreSQL database dump complete\n--\n\n";

    fn tables() -> Vec<(TableName, String)> {
        ["events", "Odd \"Name\"", "child"]
            .iter()
            .map(|n| {
                let t = TableName::new(Some("public"), n);
                let stage = format!("\"ferry_stage_1\".{}", quote_ident(n));
                (t, stage)
            })
            .collect()
    }

    #[test]
    fn moves_plain_indexes_and_keys_and_keeps_the_rest() {
        let s = split(POST, &tables(), &["public"]);
        let events = &s.per_table[&TableName::new(Some("public"), "events")];
        assert_eq!(
            events,
            "SET statement_timeout = 0;\nSELECT pg_catalog.set_config('search_path', '', false);\n\
             SET client_min_messages = warning;\nSET default_tablespace = '';\n\
             ALTER TABLE ONLY \"ferry_stage_1\".\"events\"\n    ADD CONSTRAINT events_pkey PRIMARY KEY (id);\n\
             SET default_tablespace = '';\n\
             CREATE INDEX events_kind ON \"ferry_stage_1\".\"events\" USING btree (kind) WHERE (kind <> 'x'::text);\n"
        );
        // Quoted names, a tablespace set earlier, a name that contains " ON ".
        let odd = &s.per_table[&TableName::new(Some("public"), "Odd \"Name\"")];
        assert!(odd.contains(
            "SET default_tablespace = fast;\nALTER TABLE ONLY \"ferry_stage_1\".\"Odd \"\"Name\"\"\"\n"
        ));
        assert!(odd.contains(
            "CREATE UNIQUE INDEX \"Odd \"\" ON public.events USING \" ON \"ferry_stage_1\".\"Odd \"\"Name\"\"\" USING btree (k);\n"
        ));
        assert!(
            !s.per_table
                .contains_key(&TableName::new(Some("public"), "child"))
        );
        // What stays: an expression naming an app function, the foreign key, the
        // trigger, the partitioned parent's index; the moved ones are gone.
        for kept in [
            "public.f(kind)",
            "FOREIGN KEY (e)",
            "CREATE TRIGGER t",
            "ON ONLY public.child",
            "SET default_tablespace = fast;",
        ] {
            assert!(s.rest.contains(kept), "{kept} kept");
        }
        for gone in ["PRIMARY KEY", "events_kind ON", "CREATE UNIQUE INDEX"] {
            assert!(!s.rest.contains(gone), "{gone} moved");
        }
    }

    #[test]
    fn a_dump_without_entries_or_with_odd_statements_stays_whole() {
        let s = split("SET x = 1;\n", &tables(), &["public"]);
        assert!(s.per_table.is_empty());
        assert_eq!(s.rest, "SET x = 1;\n");
        let two = "--\n-- Name: e i; Type: INDEX; Schema: public; Owner: -\n--\n\n\
                   CREATE INDEX i ON public.events USING btree (kind); SELECT 1;\n";
        let s = split(two, &tables(), &["public"]);
        assert!(s.per_table.is_empty());
        assert_eq!(s.rest, two);
    }
}
