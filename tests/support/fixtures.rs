//! Shared schemas and rows: the type zoo every value must survive.

pub const ZOO: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TABLE zoo (
  id serial PRIMARY KEY,
  ident bigint GENERATED ALWAYS AS IDENTITY,
  "camelCase" text,
  num numeric,
  r real,
  d double precision,
  b bytea,
  t text,
  j json,
  jb jsonb,
  arr integer[],
  tarr text[],
  ts timestamp,
  tstz timestamptz,
  dt date,
  tm time,
  iv interval,
  ip inet,
  u uuid,
  m mood,
  p posint,
  updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON zoo (updated_at);
CREATE TABLE "TextKey" (code text PRIMARY KEY, "Label" text, updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE composite (a int, b text, v text, updated_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (a, b));
"#;

pub const ZOO_ROWS: &str = r#"
INSERT INTO zoo ("camelCase", num, r, d, b, t, j, jb, arr, tarr, ts, tstz, dt, tm, iv, ip, u, m, p) VALUES
 ('a', 'NaN', 'NaN', 'NaN', '\x00ff5c0a'::bytea, E'tab\there\nnew line\\back\\slash', '{"k": [1, 2.50]}', '{"k": 1}',
  '{1,NULL,3}', '{"a b",NULL,"c\"d"}', '2024-02-29 12:34:56.789', '2024-02-29 12:34:56.789+05:30', '2024-02-29',
  '23:59:59.999999', '1 year 2 mons 3 days 04:05:06', '192.168.0.1/24', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'happy', 7),
 ('b', '123456789012345678901234567890.123456789', 'Infinity', '-Infinity', '', '', '{"nested":
  {"x": null}}', '[]', '{}', '{}', '-infinity', 'infinity', '0001-01-01', '00:00', '-1 days', '::1', '00000000-0000-0000-0000-000000000000', 'sad', 1),
 ('c', '-0.000', '-0', '-0', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 (NULL, '1e-20', 3.4028235e38, 1.7976931348623157e308, '\x'::bytea, 'ünïcødé ✓ 🚀', '"str"', '"str"', '{-2147483648}', '{""}', '1999-12-31 23:59:59', '1999-12-31 23:59:59-12', '1970-01-01', '12:00', '0 seconds', '10.0.0.0/8', gen_random_uuid(), 'ok', 2147483647);
INSERT INTO "TextKey" (code, "Label") VALUES ('x', 'first'), ('y''quote', 'second'), ('', 'empty key');
INSERT INTO composite (a, b, v) VALUES (1, 'one', 'v1'), (1, 'two', 'v2'), (2, 'one', 'v3');
"#;
