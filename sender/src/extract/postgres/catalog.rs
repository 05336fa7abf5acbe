//! The catalog: tables, columns (and which can be change columns), keys, indexes.

use super::{JSON_OIDS, PgSource, TIMESTAMP_OIDS};
use crate::extract::col;
use crate::extract::select::CatalogTable;
use crate::extract::{ChangeKind, ExtractError};
use ferry_common::TableName;
use ferry_common::manifest;
use std::collections::{HashMap, HashSet};

impl PgSource {
    /// The tables of the database (outside system schemas and ferry's own).
    pub async fn catalog(&mut self) -> Result<Vec<CatalogTable>, ExtractError> {
        let rows = sqlx::query(
            "SELECT c.oid::int8 AS oid, n.nspname::text AS schema, c.relname::text AS name,
                    greatest(c.relpages, 0)::int8 AS pages
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition
               AND n.nspname <> 'information_schema'
               AND n.nspname NOT LIKE 'pg\\_%'
               -- ferry-sender's own schema, not an application schema named ferry
               AND NOT (n.nspname = 'ferry'
                        AND (coalesce(obj_description(n.oid, 'pg_namespace') = $1, false)
                             OR NOT EXISTS (SELECT 1 FROM pg_class x
                                            WHERE x.relnamespace = n.oid
                                              AND x.relkind IN ('r', 'p')
                                              AND x.relname <> 'deleted_rows')))
             ORDER BY 2, 3",
        )
        .bind(super::capture::SCHEMA_MARKER)
        .fetch_all(&mut self.conn)
        .await
        .map_err(ExtractError::db("listing tables"))?;
        let mut tables: Vec<(i64, CatalogTable)> = Vec::new();
        for r in rows {
            let name = TableName::new(
                Some(col::<String, _>(&r, "schema")?.as_str()),
                col(&r, "name")?,
            );
            tables.push((
                col(&r, "oid")?,
                CatalogTable {
                    info: manifest::Table {
                        name,
                        columns: vec![],
                        primary_key: vec![],
                        foreign_keys: vec![],
                        change_column: None,
                    },
                    change_kinds: HashMap::new(),
                    indexed_first: HashSet::new(),
                    size_hint: col(&r, "pages")?,
                    partitions: None,
                    inherits: Vec::new(),
                },
            ));
        }
        self.all_tables = tables.iter().map(|(_, t)| t.info.name.clone()).collect();
        let oids: Vec<i64> = tables.iter().map(|(o, _)| *o).collect();
        let by_oid: HashMap<i64, usize> = oids.iter().enumerate().map(|(i, o)| (*o, i)).collect();

        // Partitioned tables: every member of each one's tree (itself first),
        // for its layout (see `TableMeta::partitions`), its size (its
        // partitions') and the partitions pg_dump must leave out with it.
        let tree: Vec<(i64, String, String, String, i64)> = sqlx::query_as(
            "SELECT c.oid::int8, pn.nspname::text, p.relname::text,
                    format('%I.%I %s %s', pn.nspname, p.relname,
                           coalesce(pg_get_expr(p.relpartbound, p.oid), '-'),
                           coalesce(pg_get_partkeydef(p.oid), '-')),
                    greatest(p.relpages, 0)::int8
             FROM pg_class c, pg_partition_tree(c.oid) t
             JOIN pg_class p ON p.oid = t.relid JOIN pg_namespace pn ON pn.oid = p.relnamespace
             WHERE c.relkind = 'p' AND NOT c.relispartition
             ORDER BY c.oid, t.relid <> c.oid, pn.nspname, p.relname",
        )
        .fetch_all(&mut self.conn)
        .await
        .map_err(ExtractError::db("listing partitions"))?;
        self.partitions.clear();
        for (root, schema, name, line, pages) in tree {
            let Some(&i) = by_oid.get(&root) else {
                continue;
            };
            let t = &mut tables[i].1;
            match &mut t.partitions {
                // The table itself: the partitions' pages are its size.
                None => {
                    t.partitions = Some(line);
                    t.size_hint = 0;
                }
                Some(layout) => {
                    layout.push('\n');
                    layout.push_str(&line);
                    self.partitions
                        .entry(t.info.name.clone())
                        .or_default()
                        .push(TableName::new(Some(&schema), &name));
                }
            }
            t.size_hint += pages;
        }
        let inherited: Vec<(i64, String, String)> = sqlx::query_as(
            "SELECT i.inhrelid::int8, pn.nspname::text, p.relname::text
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace pn ON pn.oid = p.relnamespace
             WHERE NOT c.relispartition ORDER BY i.inhrelid, i.inhseqno",
        )
        .fetch_all(&mut self.conn)
        .await
        .map_err(ExtractError::db("listing inherited tables"))?;
        for (child, schema, name) in inherited {
            if let Some(&i) = by_oid.get(&child) {
                tables[i]
                    .1
                    .inherits
                    .push(TableName::new(Some(&schema), &name));
            }
        }

        let cols = sqlx::query(
            "SELECT a.attrelid::int8 AS rel, a.attname::text AS name,
                    format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull AS not_null,
                    a.attgenerated <> '' AS generated,
                    CASE a.attidentity WHEN 'a' THEN 'always' WHEN 'd' THEN 'by default' END
                      AS identity,
                    (CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE a.atttypid END)::int8 AS base
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
             WHERE a.attrelid::int8 = ANY($1) AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attrelid, a.attnum",
        )
        .bind(&oids)
        .fetch_all(&mut self.conn)
        .await
        .map_err(ExtractError::db("reading columns"))?;
        self.json_columns.clear();
        for r in cols {
            let t = &mut tables[by_oid[&col::<i64, _>(&r, "rel")?]].1;
            let name: String = col(&r, "name")?;
            let base: i64 = col(&r, "base")?;
            if TIMESTAMP_OIDS.contains(&base) {
                t.change_kinds.insert(name.clone(), ChangeKind::Timestamp);
            }
            if JSON_OIDS.contains(&base) {
                self.json_columns
                    .entry(t.info.name.clone())
                    .or_default()
                    .insert(name.clone());
            }
            t.info.columns.push(manifest::Column {
                name,
                sql_type: col(&r, "type")?,
                not_null: col(&r, "not_null")?,
                generated: col(&r, "generated")?,
                identity: col(&r, "identity")?,
            });
        }

        let pks = sqlx::query(
            "SELECT i.indrelid::int8 AS rel, array_agg(a.attname::text ORDER BY k.ord) AS cols
             FROM pg_index i
             CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE i.indisprimary AND i.indrelid::int8 = ANY($1)
             GROUP BY i.indrelid",
        )
        .bind(&oids)
        .fetch_all(&mut self.conn)
        .await
        .map_err(ExtractError::db("reading primary keys"))?;
        for r in pks {
            tables[by_oid[&col::<i64, _>(&r, "rel")?]]
                .1
                .info
                .primary_key = col(&r, "cols")?;
        }

        let idx = sqlx::query(
            "SELECT DISTINCT i.indrelid::int8 AS rel, a.attname::text AS col
             FROM pg_index i JOIN pg_attribute a
               ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
             WHERE i.indrelid::int8 = ANY($1)",
        )
        .bind(&oids)
        .fetch_all(&mut self.conn)
        .await
        .map_err(ExtractError::db("reading indexes"))?;
        for r in idx {
            tables[by_oid[&col::<i64, _>(&r, "rel")?]]
                .1
                .indexed_first
                .insert(col(&r, "col")?);
        }

        let fks = sqlx::query(
            "SELECT c.conrelid::int8 AS rel, c.confrelid::int8 AS ref,
               (SELECT array_agg(a.attname::text ORDER BY k.ord)
                  FROM unnest(c.conkey) WITH ORDINALITY k(n, ord)
                  JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.n) AS cols,
               (SELECT array_agg(a.attname::text ORDER BY k.ord)
                  FROM unnest(c.confkey) WITH ORDINALITY k(n, ord)
                  JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = k.n) AS refcols
             FROM pg_constraint c
             WHERE c.contype = 'f' AND c.conrelid::int8 = ANY($1)
             ORDER BY c.conname",
        )
        .bind(&oids)
        .fetch_all(&mut self.conn)
        .await
        .map_err(ExtractError::db("reading foreign keys"))?;
        for r in fks {
            let Some(&pi) = by_oid.get(&col::<i64, _>(&r, "ref")?) else {
                continue;
            };
            let references = tables[pi].1.info.name.clone();
            tables[by_oid[&col::<i64, _>(&r, "rel")?]]
                .1
                .info
                .foreign_keys
                .push(manifest::ForeignKey {
                    columns: col(&r, "cols")?,
                    references,
                    referenced_columns: col(&r, "refcols")?,
                });
        }
        Ok(tables.into_iter().map(|(_, t)| t).collect())
    }

    /// Whether this session can see every session's transaction start (needed for
    /// a safe horizon): superuser or a member of `pg_read_all_stats`.
    pub async fn can_see_all_sessions(&mut self) -> Result<bool, ExtractError> {
        sqlx::query_scalar(
            "SELECT rolsuper OR pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')
             FROM pg_roles WHERE rolname = current_user",
        )
        .fetch_one(&mut self.conn)
        .await
        .map_err(ExtractError::db("checking the role's privileges"))
    }
}
