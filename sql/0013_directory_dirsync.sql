-- DirSync (the 1.2.840.113556.1.4.841 control) as an alternative to uSNChanged for delta reads: the
-- cookie the DC handed out with the last committed read. Like the USN watermark it moves only in the
-- transaction that merges what it covers.
ALTER TABLE certsync.directory_watermark ADD COLUMN dirsync_cookie bytea;
ALTER TABLE certsync.directory_read ADD COLUMN tracking text NOT NULL DEFAULT 'usn'
    CHECK (tracking IN ('usn', 'dirsync'));
