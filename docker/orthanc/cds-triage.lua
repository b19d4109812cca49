-- cds-triage PACS-side trigger for Orthanc (built-in Lua, Orthanc >= 1.5.7).
--
-- When a study is stable (no new instance for "StableAge" seconds), tell the triage service
-- its Study Instance UID:
--
--   POST <Url>  {"StudyInstanceUID": "1.2.3..."}   with header  X-CDS-PACS-Secret: <Secret>
--
-- Settings, from the Orthanc configuration first, else the environment:
--   "CdsTriage": { "Url": "http://cds-triage:8000/pacs/studies", "Secret": "..." }
--   CDS_TRIAGE_PACS_URL, CDS_PACS_TRIGGER_SECRET
-- The secret is the service's CDS_PACS_TRIGGER_SECRET.
--
-- Keep this callback short. Orthanc holds its Lua lock while HttpPost waits, and every HTTP
-- request to Orthanc (DICOMweb included) waits for that lock; the service therefore answers
-- at once (202) and reads the study's headers from the PACS afterwards. A failed call is
-- logged here and not retried: re-send it with the same POST (see docs/operations.md).

local function setting(key, env_name)
  local section = GetOrthancConfiguration()["CdsTriage"]
  local value = nil
  if type(section) == "table" then
    value = section[key]
  end
  if value == nil or value == "" then
    value = os.getenv(env_name)
  end
  if value == "" then
    return nil
  end
  return value
end

function OnStableStudy(studyId, tags, metadata)
  local url = setting("Url", "CDS_TRIAGE_PACS_URL")
  local secret = setting("Secret", "CDS_PACS_TRIGGER_SECRET")
  if url == nil or secret == nil then
    print("cds-triage: CdsTriage.Url or Secret not configured; study " .. studyId .. " not announced")
    return
  end
  local body = DumpJson({ StudyInstanceUID = tags["StudyInstanceUID"] }, true)
  local headers = { ["X-CDS-PACS-Secret"] = secret, ["Content-Type"] = "application/json" }
  -- HttpPost raises when the service cannot be reached; on an HTTP error status Orthanc 1.10
  -- gives no body back. The service answers {"status": "accepted", ...} when all is well.
  local sent, answer = pcall(HttpPost, url, body, headers)
  local parsed_ok, parsed = pcall(ParseJson, (sent and answer) or "")
  if parsed_ok and type(parsed) == "table" and parsed["status"] == "accepted" then
    print("cds-triage: study " .. studyId .. " announced")
    return
  end
  local why = "refused (check the secret; the service log says why)"
  if not sent or answer == nil then
    why = "service unreachable"
  elseif parsed_ok and type(parsed) == "table" and type(parsed["issue"]) == "table" and parsed["issue"][1] ~= nil then
    why = tostring(parsed["issue"][1]["diagnostics"])
  end
  print("cds-triage: announcing study " .. studyId .. " to " .. url .. " failed: " .. why)
end
