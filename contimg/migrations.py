"""The state database's schema: one SQL script per version, applied in order by
:meth:`contimg.state.StateDB.migrate` (``PRAGMA user_version`` is the version reached).
Append a script for a new version; never edit one that has shipped."""

MIGRATIONS: list[str] = [
    # --- version 1 ---------------------------------------------------------------------
    """
    CREATE TABLE groups (
        group_id      TEXT PRIMARY KEY,            -- earliest file timestamp, ISO, UTC
        t_start       REAL NOT NULL,               -- unix seconds of that timestamp
        state         TEXT NOT NULL DEFAULT 'collecting'
                      CHECK (state IN ('collecting','pending','in_progress','completed',
                                       'failed')),
        n_expected    INTEGER NOT NULL DEFAULT 16,
        n_present     INTEGER NOT NULL DEFAULT 0,
        missing       TEXT,                        -- JSON list of missing subbands
        retries       INTEGER NOT NULL DEFAULT 0,  -- failed attempts so far
        attempts      INTEGER NOT NULL DEFAULT 0,  -- claims so far
        error         TEXT,
        owner         TEXT,                        -- host:pid of the claiming process
        heartbeat     REAL,                        -- last sign of life of the owner
        has_calibrator INTEGER,
        created_at    REAL NOT NULL,
        updated_at    REAL NOT NULL,
        started_at    REAL,
        finished_at   REAL
    );
    CREATE INDEX groups_state ON groups(state, t_start);

    CREATE TABLE group_events (
        id         INTEGER PRIMARY KEY,
        group_id   TEXT NOT NULL REFERENCES groups(group_id) ON DELETE CASCADE,
        from_state TEXT,
        to_state   TEXT NOT NULL,
        at         REAL NOT NULL,
        owner      TEXT,
        reason     TEXT
    );
    CREATE INDEX group_events_group ON group_events(group_id);

    CREATE TABLE hdf5_files (
        path       TEXT PRIMARY KEY,
        group_id   TEXT REFERENCES groups(group_id) ON DELETE SET NULL,
        subband    INTEGER NOT NULL,
        timestamp  REAL NOT NULL,                  -- unix seconds from the file name
        size       INTEGER,
        status     TEXT NOT NULL DEFAULT 'seen'
                   CHECK (status IN ('seen','ready','bad','duplicate','late')),
        reason     TEXT,
        first_seen REAL NOT NULL,
        ready_at   REAL
    );
    CREATE INDEX hdf5_files_group ON hdf5_files(group_id);

    CREATE TABLE stage_timings (
        id         INTEGER PRIMARY KEY,
        group_id   TEXT NOT NULL REFERENCES groups(group_id) ON DELETE CASCADE,
        attempt    INTEGER NOT NULL,
        stage      TEXT NOT NULL,
        status     TEXT NOT NULL CHECK (status IN ('ok','skipped','failed')),
        seconds    REAL,
        started_at REAL,
        detail     TEXT,
        UNIQUE (group_id, attempt, stage)
    );

    CREATE TABLE measurement_sets (
        path       TEXT PRIMARY KEY,
        group_id   TEXT REFERENCES groups(group_id) ON DELETE SET NULL,
        t_start    REAL,
        t_end      REAL,
        nbytes     INTEGER,
        flagged_fraction REAL,
        calset_id  INTEGER REFERENCES calibration_sets(id),
        status     TEXT NOT NULL DEFAULT 'converted',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );

    CREATE TABLE calibration_sets (
        id          INTEGER PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        ms_path     TEXT,
        calibrator  TEXT,
        t_transit   REAL,
        valid_start REAL,
        valid_end   REAL,
        refant      INTEGER,
        tables      TEXT NOT NULL DEFAULT '{}',    -- JSON {"B": path, "G": path}
        params      TEXT NOT NULL DEFAULT '{}',    -- JSON solver parameters
        quality     TEXT NOT NULL DEFAULT '{}',    -- JSON quality figures
        status      TEXT NOT NULL CHECK (status IN ('valid','rejected')),
        reason      TEXT,
        created_at  REAL NOT NULL
    );
    CREATE INDEX calibration_sets_time ON calibration_sets(status, t_transit);

    CREATE TABLE images (
        path       TEXT PRIMARY KEY,               -- the restored image (FITS)
        group_id   TEXT REFERENCES groups(group_id) ON DELETE SET NULL,
        ms_path    TEXT,
        kind       TEXT NOT NULL DEFAULT 'continuum',
        products   TEXT NOT NULL DEFAULT '{}',     -- JSON {"residual": path, ...}
        noise_jy   REAL,
        peak_jy    REAL,
        beam       TEXT,                           -- JSON {"bmaj_deg", "bmin_deg", "bpa_deg"}
        calset_id  INTEGER REFERENCES calibration_sets(id),
        created_at REAL NOT NULL
    );

    CREATE TABLE sources (
        id      INTEGER PRIMARY KEY,
        name    TEXT NOT NULL UNIQUE,
        ra_deg  REAL NOT NULL,
        dec_deg REAL NOT NULL,
        flux_jy REAL,
        origin  TEXT
    );

    CREATE TABLE photometry (
        id         INTEGER PRIMARY KEY,
        source_id  INTEGER NOT NULL REFERENCES sources(id) ON DELETE CASCADE,
        image_path TEXT NOT NULL REFERENCES images(path) ON DELETE CASCADE,
        t_mid      REAL,
        flux_jy    REAL,
        err_jy     REAL,
        UNIQUE (source_id, image_path)
    );
    """,
    # --- version 2: science products (catalogues, photometry, variability, mosaics) ----
    """
    CREATE TABLE catalogs (
        id         INTEGER PRIMARY KEY,
        name       TEXT NOT NULL UNIQUE,
        path       TEXT,
        format     TEXT,
        n_rows     INTEGER,
        n_new      INTEGER,                        -- sources it added
        n_matched  INTEGER,                        -- rows that matched a known source
        loaded_at  REAL NOT NULL
    );
    ALTER TABLE sources ADD COLUMN catalog_id INTEGER REFERENCES catalogs(id);
    ALTER TABLE sources ADD COLUMN flux_err_jy REAL;
    ALTER TABLE sources ADD COLUMN alpha REAL;
    ALTER TABLE sources ADD COLUMN ref_freq_hz REAL;
    ALTER TABLE photometry ADD COLUMN peak_jy REAL;   -- apparent (no PB correction)
    ALTER TABLE photometry ADD COLUMN rms_jy REAL;    -- local rms, Jy/beam
    ALTER TABLE photometry ADD COLUMN pb REAL;        -- primary-beam response
    ALTER TABLE photometry ADD COLUMN flags INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE photometry ADD COLUMN norm_flux_jy REAL;  -- flux_jy / the image's scale
    ALTER TABLE photometry ADD COLUMN norm_err_jy REAL;
    CREATE INDEX photometry_source_time ON photometry(source_id, t_mid);
    CREATE INDEX photometry_image ON photometry(image_path);

    CREATE TABLE image_flux_scale (
        image_path TEXT PRIMARY KEY REFERENCES images(path) ON DELETE CASCADE,
        t_mid      REAL,
        scale      REAL,                           -- median measured/expected of references
        scale_err  REAL,
        n_ref      INTEGER NOT NULL,
        n_measured INTEGER NOT NULL,
        created_at REAL NOT NULL
    );

    CREATE TABLE source_stats (                    -- running sums, one row per source
        source_id  INTEGER PRIMARY KEY REFERENCES sources(id) ON DELETE CASCADE,
        n          INTEGER NOT NULL DEFAULT 0,
        sum_w      REAL NOT NULL DEFAULT 0,        -- sum 1/err^2
        sum_wf     REAL NOT NULL DEFAULT 0,        -- sum f/err^2
        sum_wf2    REAL NOT NULL DEFAULT 0,        -- sum f^2/err^2
        sum_f      REAL NOT NULL DEFAULT 0,
        sum_f2     REAL NOT NULL DEFAULT 0,
        eta        REAL,                           -- weighted reduced chi^2
        v          REAL,                           -- modulation index
        max_dev    REAL,                           -- largest sigma-deviation of an epoch
        max_vs     REAL,                           -- largest |Vs| (Mooley et al. 2016)
        m_at_max_vs REAL,
        last_flux  REAL, last_err REAL,
        min_flux   REAL, min_err REAL,
        max_flux   REAL, max_err REAL,
        t_first    REAL, t_last REAL,
        updated_at REAL
    );
    CREATE INDEX source_stats_eta ON source_stats(eta);

    CREATE TABLE ese_candidates (
        id          INTEGER PRIMARY KEY,
        source_id   INTEGER NOT NULL REFERENCES sources(id) ON DELETE CASCADE,
        preset      TEXT NOT NULL,
        score       REAL NOT NULL,
        t_start     REAL,
        t_end       REAL,
        depth_jy    REAL,
        depth_sigma REAL,
        edge_sigma  REAL,
        n_epochs    INTEGER,
        evidence    TEXT NOT NULL DEFAULT '{}',    -- JSON: the light curve and the fit
        status      TEXT NOT NULL DEFAULT 'new',
        created_at  REAL NOT NULL,
        updated_at  REAL NOT NULL,
        UNIQUE (source_id, preset)
    );
    CREATE INDEX ese_candidates_score ON ese_candidates(score);

    CREATE TABLE mosaics (
        id         INTEGER PRIMARY KEY,
        name       TEXT NOT NULL UNIQUE,
        t_start    REAL,
        t_end      REAL,
        status     TEXT NOT NULL DEFAULT 'planned'
                   CHECK (status IN ('planned','built','failed')),
        path       TEXT,
        products   TEXT NOT NULL DEFAULT '{}',     -- JSON {"weight": path, "noise": path}
        noise_jy   REAL,
        n_images   INTEGER,
        error      TEXT,
        created_at REAL NOT NULL,
        built_at   REAL
    );
    CREATE TABLE mosaic_members (
        mosaic_id  INTEGER NOT NULL REFERENCES mosaics(id) ON DELETE CASCADE,
        image_path TEXT NOT NULL REFERENCES images(path) ON DELETE CASCADE,
        PRIMARY KEY (mosaic_id, image_path)
    );
    """,
    # --- version 3: operator app (contimg.app): accounts, API tokens, login throttling, QA --
    """
    CREATE TABLE users (
        name          TEXT PRIMARY KEY,
        role          TEXT NOT NULL CHECK (role IN ('viewer','operator','admin')),
        password_hash TEXT,                        -- argon2id (NULL: no password login)
        session_epoch INTEGER NOT NULL DEFAULT 0,  -- bumped to end every browser session
        created_at    REAL NOT NULL,
        updated_at    REAL NOT NULL
    );

    CREATE TABLE api_tokens (
        id           INTEGER PRIMARY KEY,
        user_name    TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        token_hash   TEXT NOT NULL UNIQUE,         -- SHA-256 of the token (never the token)
        label        TEXT,
        created_at   REAL NOT NULL,
        last_used_at REAL,
        revoked_at   REAL
    );

    CREATE TABLE login_failures (
        user_name TEXT PRIMARY KEY,                -- as typed (unknown names count too)
        failures  INTEGER NOT NULL,
        last_at   REAL NOT NULL
    );

    ALTER TABLE images ADD COLUMN qa TEXT;         -- JSON: thumbnail, n_components, ...
    CREATE INDEX groups_time ON groups(t_start);
    CREATE INDEX groups_finished ON groups(state, finished_at);
    CREATE INDEX images_time ON images(created_at);
    CREATE INDEX images_group ON images(group_id);
    CREATE INDEX measurement_sets_group ON measurement_sets(group_id);
    """,
    # --- version 4: calibration sets are versioned; a re-solve adds a version and never
    # replaces a set (a rejected re-solve used to overwrite a valid one of its name) ------
    """
    CREATE TABLE calibration_sets_v2 (
        id          INTEGER PRIMARY KEY,
        name        TEXT NOT NULL,
        version     INTEGER NOT NULL DEFAULT 1,    -- 1, 2, ... per name, in solve order
        ms_path     TEXT,
        calibrator  TEXT,
        t_transit   REAL,
        valid_start REAL,
        valid_end   REAL,
        refant      INTEGER,
        tables      TEXT NOT NULL DEFAULT '{}',
        params      TEXT NOT NULL DEFAULT '{}',
        quality     TEXT NOT NULL DEFAULT '{}',
        status      TEXT NOT NULL CHECK (status IN ('valid','rejected')),
        reason      TEXT,
        created_at  REAL NOT NULL,
        UNIQUE (name, version)
    );
    INSERT INTO calibration_sets_v2 (id, name, version, ms_path, calibrator, t_transit,
        valid_start, valid_end, refant, tables, params, quality, status, reason, created_at)
        SELECT id, name, 1, ms_path, calibrator, t_transit, valid_start, valid_end, refant,
               tables, params, quality, status, reason, created_at FROM calibration_sets;
    DROP TABLE calibration_sets;
    ALTER TABLE calibration_sets_v2 RENAME TO calibration_sets;
    CREATE INDEX calibration_sets_time ON calibration_sets(status, t_transit);
    """,
    # --- version 5: a group is named after its earliest subband's timestamp (its products'
    # name); one registered under a later file's name is renamed when the earlier file
    # arrives, and its former names still find it (logs, links) ----------------------
    """
    CREATE TABLE group_aliases (
        alias      TEXT PRIMARY KEY,               -- a former group_id
        group_id   TEXT NOT NULL REFERENCES groups(group_id) ON DELETE CASCADE,
        renamed_at REAL NOT NULL
    );
    CREATE INDEX group_aliases_group ON group_aliases(group_id);
    """,
]
