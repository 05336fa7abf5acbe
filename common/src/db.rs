//! Database errors as an operator reads them: PostgreSQL's message with its
//! detail and hint, without the position in PostgreSQL's own C source that
//! sqlx appends (`… at line 334`).

/// `e` for a log line or an error message.
pub fn describe(e: &sqlx::Error) -> String {
    let sqlx::Error::Database(d) = e else {
        return e.to_string();
    };
    let Some(pg) = d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() else {
        return d.message().to_owned();
    };
    let mut out = pg.message().to_owned();
    if let Some(detail) = pg.detail() {
        out.push_str(&format!(" ({detail})"));
    }
    if let Some(hint) = pg.hint() {
        out.push_str(&format!(" (hint: {hint})"));
    }
    out
}
