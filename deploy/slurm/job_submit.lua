-- dynvm: run every batch script, unmodified, inside its job's own VM (slurm.conf: JobSubmitPlugins=lua;
-- this file goes next to slurm.conf).  The submitted script is hex-encoded into a here-document for the
-- payload wrapper: hex has no character a shell, the delimiter or the script itself could use to break
-- out, whatever the user wrote.  #SBATCH lines were read by sbatch before this runs, so nothing is lost.
-- srun/salloc jobs (no batch script) are not wrapped.
local WRAPPER = "/usr/local/libexec/dynvm/payload"
local MARK = "# dynvm-payload-wrapper"

local function hex(s)
   return (s:gsub(".", function(c) return string.format("%02x", string.byte(c)) end))
end

function slurm_job_submit(job_desc, part_list, submit_uid)
   local script = job_desc.script
   if script == nil or script == "" then
      return slurm.SUCCESS
   end
   if string.find(script, MARK, 1, true) == 1 + string.len("#!/bin/sh\n") then
      return slurm.SUCCESS -- already wrapped (a requeue or an update)
   end
   local body = hex(script):gsub(string.rep(".", 100), "%0\n")
   job_desc.script = "#!/bin/sh\n" .. MARK .. "\nexec " .. WRAPPER .. " --hex <<'DYNVM_END'\n" .. body ..
      "\nDYNVM_END\n"
   return slurm.SUCCESS
end

function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)
   return slurm.SUCCESS
end

return slurm.SUCCESS
